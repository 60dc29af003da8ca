"""A rollout fleet against one server on the same machine (`model=URL1,URL2`, `FleetPolicy`):
160 chat requests (arith questions, T=1, max_tokens=48) through `policy.generate`, sent
concurrently, with one replica (`threads=2`) and with two (`threads=1` each: the same CPU
budget, so the ratio shows the fleet's overhead and batching, not more hardware). Then
sync: `publish` of a tiny LoRA learner (save, load on every replica, canary on each) to 1
and to 2 replicas, the median of 5. On one 2-core machine two replicas cannot be faster
than one; on N GPUs each replica has its own device and throughput adds up.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from selfevolve import SamplingParams
from selfevolve.data import arith
from selfevolve.policies import load_policy, resolve_model_path
from selfevolve.serving.process import ServerProcess
from selfevolve.training.learner import trainable_model
from selfevolve.training.publish import publish

N, MAX_TOKENS, SYNCS = 160, 48, 5


def _measure(urls: str, tmp: Path) -> tuple[float, float]:
    policy = load_policy(urls, "openai")
    convs = [[{"role": "user", "content": t.prompt}] for t in arith.tasks("test", n=N, seed=7)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=MAX_TOKENS, seed=0)
    policy.generate(convs[:4], sampling)  # warm-up
    t0 = time.perf_counter()
    policy.generate(convs, sampling)
    rps = N / (time.perf_counter() - t0)
    learner = trainable_model("tiny", r=16, alpha=32)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    times = []
    for k in range(SYNCS):
        with torch.no_grad():
            for n, p in learner.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        t0 = time.perf_counter()
        publish(policy, learner, tok, tmp / f"a{k}", f"a{k}", replaces=f"a{k - 1}" if k else None)
        times.append(time.perf_counter() - t0)
    return rps, statistics.median(times)


def run() -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with ServerProcess("threads=2", f"traces={tmp}/one.sqlite") as one:
            one_rps, one_sync = _measure(one.url, tmp / "one")
        with ServerProcess("threads=1", f"traces={tmp}/a.sqlite") as a, \
                ServerProcess("threads=1", f"traces={tmp}/b.sqlite") as b:
            two_rps, two_sync = _measure(f"{a.url},{b.url}", tmp / "two")
    return {"title": "Rollout fleet: two selfevolve serve replicas vs one (same machine, same CPU budget)",
            "doc": __doc__.strip(),
            "rows": [("1 replica, threads=2", f"{one_rps:.1f} req/s", f"sync (publish) {one_sync * 1000:.0f} ms"),
                     ("2 replicas, threads=1 each", f"{two_rps:.1f} req/s",
                      f"sync (publish) {two_sync * 1000:.0f} ms")],
            "ratios": [("2 replicas / 1 replica throughput", two_rps / one_rps),
                       ("sync time, 2 replicas / 1", two_sync / one_sync)]}
