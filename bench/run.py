"""Run every benchmark and write BENCHMARKS.md (machine, date, command, figures).

    pip install -e ".[bench]" && python bench/run.py
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_generation  # noqa: E402
import bench_sft  # noqa: E402
import bench_verifiers  # noqa: E402

BENCHES = [bench_generation, bench_verifiers, bench_sft]


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def main() -> None:
    """`python bench/run.py [NAME ...]` runs all benchmarks, or those named (generation, verifiers, sft)."""
    os.environ.setdefault("SELFEVOLVE_QUIET", "1")
    chosen = [b for b in BENCHES if not sys.argv[1:] or b.__name__.removeprefix("bench_") in sys.argv[1:]]
    out = ["# Benchmarks", "", f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()}",
           "- command: `pip install -e \".[bench]\" && python bench/run.py`", ""]
    for b in chosen:
        r = b.run()
        out += [f"## {r['title']}", "", r["doc"], "", "| what | throughput | detail |", "|---|---|---|"]
        out += [f"| {a} | {t} | {d} |" for a, t, d in r["rows"]]
        out += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in r["ratios"]] + [""]
        print("\n".join(out[-(len(r['ratios']) + 3):]))
    Path(__file__).parent.parent.joinpath("BENCHMARKS.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
