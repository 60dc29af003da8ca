"""The data-parallel learner against one process: one SFT epoch (`learner.sft`, 2048 arith
conversations, batch 64, LoRA r=16 on tiny) in one process with 2 threads, and under
`torchrun --nproc-per-node=2` with 1 thread each — the same CPU budget. Each rank runs half
of every batch and the gradients are summed in one all-reduce per step (gloo). Timed from
the first step to the last, model loading excluded. On a 2-core machine two processes cannot
beat one process with two threads: the figure is the overhead of the collectives and of
smaller matrix products per process; on N GPUs each rank has its own device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

N, BATCH = 2048, 64


def worker(out: str) -> None:
    import torch
    from transformers import AutoTokenizer

    from selfevolve.data import arith
    from selfevolve.models import resolve_model_path
    from selfevolve.training import distributed
    from selfevolve.training.learner import sft, trainable_model

    distributed.init()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    model = trainable_model("tiny", r=16, alpha=32)
    convs = [[{"role": "user", "content": t.prompt}, {"role": "assistant", "content": f"The answer is {t.reference}."}]
             for t in arith.tasks("train", n=N, seed=3)]
    sft(model, tok, convs[:BATCH], epochs=1, batch_size=BATCH)  # warm-up step
    distributed.barrier()
    t0 = time.perf_counter()
    stats = sft(model, tok, convs, epochs=1, batch_size=BATCH)
    seconds = time.perf_counter() - t0
    if distributed.is_main():
        Path(out).write_text(json.dumps({"seconds": seconds, "steps": stats["sft_steps"]}))


def _time(nproc: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={nproc}"]
    subprocess.run([*launch, __file__, "--worker", str(out)], env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def run() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        one, two = _time(1, Path(d) / "one.json"), _time(2, Path(d) / "two.json")
    rows = [(f"{n} process, 2 threads" if n == 1 else f"{n} processes, 1 thread each",
             f"{N / r['seconds']:.1f} conversations/s", f"{r['steps']} steps in {r['seconds']:.2f} s")
            for n, r in ((1, one), (2, two))]
    return {"title": "Data-parallel learner: one SFT epoch, 2 processes vs 1 (same machine, same CPU budget)",
            "doc": __doc__.strip(), "rows": rows,
            "ratios": [("2 processes / 1 process throughput", one["seconds"] / two["seconds"])]}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        print(run())
