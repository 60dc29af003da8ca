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

import bench_ddp  # noqa: E402
import bench_evolve  # noqa: E402
import bench_fleet  # noqa: E402
import bench_gate  # noqa: E402
import bench_generation  # noqa: E402
import bench_memory  # noqa: E402
import bench_run_memory  # noqa: E402
import bench_score  # noqa: E402
import bench_serve  # noqa: E402
import bench_sft  # noqa: E402
import bench_staleness  # noqa: E402
import bench_step_memory  # noqa: E402
import bench_store  # noqa: E402
import bench_verifiers  # noqa: E402
import bench_vllm  # noqa: E402

BENCHES = [bench_generation, bench_verifiers, bench_sft, bench_serve, bench_fleet, bench_ddp, bench_staleness,
           bench_score, bench_memory, bench_step_memory, bench_run_memory, bench_evolve, bench_vllm, bench_gate,
           bench_store]


def machine() -> str:
    import torch

    cpu = (next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor())
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def main() -> None:
    """`python bench/run.py [NAME ...]` runs all benchmarks, or those named (generation,
    verifiers, sft, serve, fleet, ddp, staleness, score, memory, step_memory, run_memory,
    evolve, vllm, gate, store); sections of benchmarks not run stay as they were, each with its own date."""
    os.environ.setdefault("SELFEVOLVE_QUIET", "1")
    chosen = [b for b in BENCHES if not sys.argv[1:] or b.__name__.removeprefix("bench_") in sys.argv[1:]]
    path = Path(__file__).parent.parent / "BENCHMARKS.md"
    sections = _sections(path.read_text()) if path.exists() else {}
    for b in chosen:
        r = b.run()
        lines = [f"## {r['title']}", "", f"{datetime.date.today().isoformat()}, {machine()}", "", r["doc"], "",
                 "| what | throughput | detail |", "|---|---|---|"]
        lines += [f"| {a} | {t} | {d} |" for a, t, d in r["rows"]]
        lines += (["", "| ratio | value |",
                   "|---|---|"] + [f"| {k} | {v if isinstance(v, str) else f'{v:.2f}x'} |" for k,
                                                            v in r["ratios"]] + [""])
        sections[r["title"]] = "\n".join(lines)
        print(sections[r["title"]])
    head = ["# Benchmarks", "",
            '- command: `pip install -e ".[bench]" && python bench/run.py [NAME ...]` (generation, verifiers, sft, '
            'serve, fleet, ddp, staleness, score, memory, step_memory, run_memory, evolve, vllm, gate, store; '
            'none: all)',
            "- each section names the date and machine it was measured on; sections dated before 2026-12-06",
            "  were measured on the former GPT-2 `tiny` (0.87M parameters), later ones on the Llama `tiny`",
            "- vllm runs in the virtualenv `bash bench/vllm-env.sh` makes (SELFEVOLVE_VLLM_PYTHON)", ""]
    path.write_text("\n".join(head) + "\n" + "\n".join(s.rstrip("\n") + "\n" for s in sections.values()))


def _sections(text: str) -> dict[str, str]:
    """BENCHMARKS.md's `## title` sections, in order."""
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            out[title] = []
        if title:
            out[title].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


if __name__ == "__main__":
    main()
