"""Bounded staleness: SCoRe steps with `max_staleness=1` (the next batch is generated while
the learner trains) against `max_staleness=0` (synchronous), in two set-ups on the same
machine: (a) the served policy in the learner's process (`policy=hf`, one process with 2
threads), and (b) rollouts on a `selfevolve serve` process (`policy=openai`, 1 thread) and the
learner in another (1 thread) — the shape of a GPU deployment, where generation and training
are on different devices. A real `selfevolve run recipe=score` of 20 steps (batch 64,
checkpoint every 10, evaluations excluded); a step's time is what the learner's thread
spends on it: waiting for its batch (K=1) or generating and verifying it (K=0), training,
saving the update, checkpointing. Both set-ups share the same 2 cores; neither generation
nor training alone keeps both busy, and that idle capacity is what the overlap uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from selfevolve.serving.process import ServerProcess

STEPS = ["stage1_steps=5", "stage2_steps=15", "eval_limit=50", "val_limit=50", "eval_every=100",
         "checkpoint_every=10"]


def _seconds_per_step(run_dir: Path, extra: list[str], threads: int) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(["selfevolve", "run", "recipe=score", *STEPS, *extra, f"run_dir={run_dir}"], check=True,
                   capture_output=True, env=env)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"time_train"' in x]
    main = [m.get("time_wait", m["time_generate"] + m["time_verify"]) + m["time_train"] + m["time_sync"]
            + m["time_checkpoint"] for m in steps]
    return sum(main) / len(main), sum(m["time_generate"] for m in steps) / len(steps)


def run() -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for k in (0, 1):
            results["hf", k] = _seconds_per_step(tmp / f"hf{k}", [f"max_staleness={k}"], threads=2)
        with ServerProcess("threads=1", f"traces={tmp}/serve.sqlite") as server:
            for k in (0, 1):
                results["openai", k] = _seconds_per_step(
                    tmp / f"openai{k}", ["policy=openai", f"model={server.url}/v1", f"max_staleness={k}"], threads=1)
    where = {"hf": "(a) in process, policy=hf", "openai": "(b) selfevolve serve + learner, policy=openai"}
    rows = [(f"{where[p]}, max_staleness={k}", f"{1 / s:.3f} steps/s",
             f"{s:.2f} s per step on the learner's thread; generation {g:.2f} s")
            for (p, k), (s, g) in results.items()]
    return {"title": "Bounded staleness: SCoRe steps with max_staleness=1 vs 0 (same machine)",
            "doc": __doc__.strip(), "rows": rows,
            "ratios": [(f"{where[p]}: max_staleness=1 / 0 steps/s", results[p, 0][0] / results[p, 1][0])
                       for p in ("hf", "openai")]}


if __name__ == "__main__":
    print(run())
