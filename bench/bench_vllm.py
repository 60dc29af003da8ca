"""vLLM (CPU build) against HFPolicy on the same model, batch and lengths, in one run:
rollout tokens/s of HFPolicy, vllm.LLM in process (`policy=vllm`) and `vllm serve` over HTTP
(`policy=openai`); the wall time of a small SCoRe run (one step of each stage) and a ReST-EM
iteration with each; resident memory of each engine (its process tree). The measuring runs
under the python of the vLLM virtualenv (bench/vllm-env.sh; SELFEVOLVE_VLLM_PYTHON, default
.venv-vllm/bin/python), which has all three:

    python bench/run.py vllm                               # writes its section of BENCHMARKS.md
    .venv-vllm/bin/python bench/bench_vllm.py --out x.json  # the measurement alone

Absolute numbers are this machine's; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BATCH, NEW_TOKENS, REPEATS = 64, 64, 3
SCORE = ["recipe=score", "stage1_steps=1", "stage2_steps=1", "batch_tasks=32", "train_tasks=64", "eval_limit=8",
         "val_limit=8", "eval_every=100", "max_new_tokens=64"]
REST_EM = ["recipe=rest_em", "iterations=1", "train_tasks=64", "num_samples=2", "eval_limit=8", "val_limit=8",
           "epochs=1", "max_new_tokens=64"]


def tree_rss(pid: int) -> float:
    """Resident memory of a process and its children, GiB."""
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**30


def rollouts(policy, label: str) -> dict:
    from selfevolve.data import arith
    from selfevolve.types import SamplingParams

    convs = [[{"role": "user", "content": t.prompt}] for t in arith.tasks("validation", BATCH, seed=1)]
    s = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0, logprobs=True)
    policy.generate(convs[:8], s)  # warm-up (vLLM compiles on its first request)
    times, tokens = [], 0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = policy.generate(convs, s)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(t.token_ids or []) for turns in out for t in turns)
    best = min(times)
    print(f"{label}: {tokens} tokens in {best:.2f} s = {tokens / best:.0f} tokens/s", flush=True)
    return {"tokens": tokens, "seconds": round(best, 3), "tokens_per_s": round(tokens / best, 1)}


def timed_run(args: list[str], extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "selfevolve.cli", "run", *args, *extra, f"run_dir={d}/run"],
                           capture_output=True, text=True, env=dict(os.environ, SELFEVOLVE_QUIET="1"))
        if r.returncode:
            raise SystemExit(f"{' '.join(args + extra)} failed:\n{r.stderr[-2000:]}")
        return round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-vllm.json")
    out = Path(ap.parse_args().out)
    import torch
    import vllm

    from selfevolve.models import resolve_model_path
    from selfevolve.policies import HFPolicy, OpenAIPolicy
    from selfevolve.policies.vllm import VLLMPolicy
    from selfevolve.serving.process import VLLMServerProcess

    torch.set_num_threads(2)
    tiny = str(resolve_model_path("tiny"))
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), "vllm_version": vllm.__version__, "torch": torch.__version__,
           "batch": BATCH, "max_new_tokens": NEW_TOKENS}
    base = tree_rss(os.getpid())
    hf = HFPolicy("tiny", device="cpu", batch_size=BATCH)
    res["hf"] = rollouts(hf, "HFPolicy") | {"rss_gib": round(tree_rss(os.getpid()) - base, 2)}
    del hf
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    before = tree_rss(os.getpid())
    inproc = VLLMPolicy("tiny", dtype="float32", max_lora_rank=16)
    res["vllm"] = rollouts(inproc, "vllm.LLM in process") | {"rss_gib": round(tree_rss(os.getpid()) - before, 2)}
    del inproc
    with tempfile.NamedTemporaryFile(suffix=".log") as log, VLLMServerProcess(sys.executable, tiny, log.name) as srv:
        res["vllm_http"] = rollouts(OpenAIPolicy(srv.url), "vllm serve over HTTP") | {
            "rss_gib": round(tree_rss(srv.proc.pid), 2)}
        url = f"model={srv.url}/v1"
        res["score_run_s"] = {"hf": timed_run(SCORE, []), "vllm": timed_run(SCORE, ["policy=vllm"]),
                              "vllm_http": timed_run(SCORE, ["policy=openai", url])}
        res["rest_em_run_s"] = {"hf": timed_run(REST_EM, []), "vllm": timed_run(REST_EM, ["policy=vllm"]),
                                "vllm_http": timed_run(REST_EM, ["policy=openai", url])}
    for k in ("vllm", "vllm_http"):
        res[f"{k}_vs_hf_tokens_per_s"] = round(res[k]["tokens_per_s"] / res["hf"]["tokens_per_s"], 2)
    print(json.dumps(res, indent=1))
    out.write_text(json.dumps(res, indent=1))


def run() -> dict:
    """bench/run.py's entry: the measurement in the vLLM virtualenv, as BENCHMARKS.md rows."""
    python = os.environ.get("SELFEVOLVE_VLLM_PYTHON", str(Path(__file__).parent.parent / ".venv-vllm/bin/python"))
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([python, __file__, "--out", f"{d}/r.json"], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"bench_vllm failed (SELFEVOLVE_VLLM_PYTHON={python}):\n{r.stderr[-2000:]}")
        res = json.loads(Path(f"{d}/r.json").read_text())
    names = {"hf": "HFPolicy (transformers, in process)", "vllm": "vllm.LLM in process (policy=vllm)",
             "vllm_http": "vllm serve over HTTP (policy=openai)"}
    rows = [(names[k], f"{res[k]['tokens_per_s']:.0f} tokens/s",
             f"{res[k]['tokens']} tokens in {res[k]['seconds']} s; engine memory {res[k]['rss_gib']} GiB")
            for k in names]
    rows += [(f"{names[k]}: SCoRe run / ReST-EM run", f"{res['score_run_s'][k]} s / {res['rest_em_run_s'][k]} s",
              "wall time of the whole small run") for k in names]
    return {"title": "vLLM (CPU build) vs HFPolicy: rollouts, a SCoRe and a ReST-EM run, memory",
            "doc": (f"vllm {res['vllm_version']} and torch {res['torch']}; tiny, {res['batch']} arith prompts at "
                    "temperature 1, "
                    f"max_new_tokens={res['max_new_tokens']}, log-probs on, best of {REPEATS} after a warm-up; "
                    "SCoRe: `" + " ".join(SCORE) + "`; ReST-EM: `" + " ".join(REST_EM) + "` (each with its "
                    "evaluations; a policy=vllm run includes starting vllm.LLM, about 25 s here). On a "
                    "0.9M-parameter model the per-token work is too small for vLLM's batching to pay for its "
                    "overhead; the ratios are this model's, not a real one's. Command: `python bench/run.py vllm`."),
            "rows": rows,
            "ratios": [("vLLM in process / HFPolicy, rollout tokens/s", res["vllm_vs_hf_tokens_per_s"]),
                       ("vLLM over HTTP / HFPolicy, rollout tokens/s", res["vllm_http_vs_hf_tokens_per_s"]),
                       ("SCoRe run, HFPolicy / vLLM in process", res["score_run_s"]["hf"] / res["score_run_s"]["vllm"]),
                       ("SCoRe run, HFPolicy / vLLM over HTTP",
                        res["score_run_s"]["hf"] / res["score_run_s"]["vllm_http"]),
                       ("ReST-EM run, HFPolicy / vLLM in process",
                        res["rest_em_run_s"]["hf"] / res["rest_em_run_s"]["vllm"]),
                       ("ReST-EM run, HFPolicy / vLLM over HTTP",
                        res["rest_em_run_s"]["hf"] / res["rest_em_run_s"]["vllm_http"])]}


if __name__ == "__main__":
    main()
