"""SCoRe on the tiny world: (1) where a step's time goes, from the recipe's own metrics
(a real `selfevolve run recipe=score` of 20 steps, batch 64, checkpoint every 10 steps;
evaluations excluded), the same run with `y2_samples=4` (four second attempts after each
first: 256 episodes a step) beside it, and (2) the policy-gradient update's throughput (labelled tokens/s,
forward + backward + AdamW step) against a plain PyTorch loop computing the same loss on
the same 64 episodes: separate forward passes for each attempt and a separate frozen copy
of the base model as the reference, the loss written out inline. 5 interleaved repeats
after a warm-up; medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))


def time_split(*extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["selfevolve", "run", "recipe=score", "stage1_steps=5", "stage2_steps=15", "eval_limit=50",
                        "val_limit=50", "eval_every=100", "checkpoint_every=10", f"run_dir={tmp}/r", *extra],
                       check=True, capture_output=True)
        lines = [json.loads(x) for x in Path(f"{tmp}/r/metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "time_generate" in m]
    keys = ["time_generate", "time_verify", "time_train", "time_sync", "time_checkpoint"]
    totals = {k: sum(m[k] for m in steps) for k in keys}
    return {"steps": len(steps), **totals, "total": sum(totals.values())}


def plain_update(model, ref_model, opt, traces, tokenizer, pad_id, instruction, r1, r2, cfg):
    """What one writes by hand: per attempt, encode, forward, reference forward, loss."""
    from selfevolve.training.learner import encode_chat, pad_batch
    loss = 0.0
    for k in (1, 2):
        rows = []
        for t in traces:
            conv = [{"role": "user", "content": t.task.prompt}, {"role": "assistant", "content": t.turns[0].response}]
            if k == 2:
                conv += [{"role": "user", "content": instruction}, {"role": "assistant",
                                                                    "content": t.turns[1].response}]
            rows.append(encode_chat(tokenizer, conv, "last"))
        b = pad_batch(rows, pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        with torch.no_grad():
            ref_logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        mask = (tgt != -100).float()
        lp = torch.log_softmax(logits, -1).gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1) * mask
        ref = torch.log_softmax(ref_logits, -1).gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1) * mask
        d = (ref - lp) * mask
        kl = ((torch.exp(d) - d - 1) * mask).sum(-1).mean()
        r = r1 if k == 1 else r2 + cfg.alpha * (r2 - r1)
        adv = (r - (r.sum() - r) / (len(r) - 1)) / (r.std() + 1e-6)
        loss = loss + (-(adv * lp.sum(-1)).mean()) + cfg.beta1 * kl
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()


def update_throughput() -> tuple[float, float, int]:
    from transformers import AutoModelForCausalLM

    from selfevolve.config import build
    from selfevolve.data import arith
    from selfevolve.policies import HFPolicy
    from selfevolve.recipes.score import ScoreConfig, rollouts, score_loss
    from selfevolve.run import Run
    from selfevolve.training.learner import episode_batch, trainable_model

    torch.set_num_threads(2)
    policy = HFPolicy("tiny", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build(ScoreConfig, {"recipe": "score", "run_dir": f"{tmp}/r", "max_new_tokens": 64})
        run = Run(cfg)
        traces, _ = rollouts(policy, arith.tasks("train", n=64, seed=3), run.verifier, cfg, 0, run)
    r1 = torch.tensor([t.turns[0].score for t in traces])
    r2 = torch.tensor([t.turns[1].score for t in traces])
    ours = trainable_model(policy.path)
    plain = trainable_model(policy.path)
    ref_model = AutoModelForCausalLM.from_pretrained(policy.path).eval()
    opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_b = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-5)
    tok, pad = policy.tokenizer, policy.pad_id
    _, m1, m2, _ = episode_batch(traces, tok, pad, cfg.instruction)
    tokens = int(m1.sum() + m2.sum())

    def selfevolve_step():
        loss, _ = score_loss(ours, episode_batch(traces, tok, pad, cfg.instruction), r1, r2, 2, cfg)
        opt_a.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in ours.parameters() if p.requires_grad], 1.0)
        opt_a.step()

    def plain_step():
        plain_update(plain, ref_model, opt_b, traces, tok, pad, cfg.instruction, r1, r2, cfg)

    times = {"ours": [], "plain": []}
    selfevolve_step(), plain_step()
    for _ in range(5):
        for name, fn in (("ours", selfevolve_step), ("plain", plain_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return tokens / statistics.median(times["ours"]), tokens / statistics.median(times["plain"]), tokens


def run() -> dict:
    split, grouped = time_split(), time_split("y2_samples=4")
    ours, plain, tokens = update_throughput()
    share = lambda k: split[k] / split["total"]  # noqa: E731
    per_step, grouped_step = split["total"] / split["steps"], grouped["total"] / grouped["steps"]
    return {
        "title": "SCoRe: step time split, and the policy-gradient update vs a plain PyTorch loop",
        "doc": __doc__.strip(),
        "rows": [
            (
                "step time split (20 steps)",
                f"{per_step:.2f} s/step",
                ", ".join(
                    f"{k[5:]} {share(k) * 100:.1f}%"
                    for k in ("time_generate", "time_verify", "time_train", "time_sync", "time_checkpoint")
                ),
            ),
            (
                "step time, y2_samples=4 (20 steps)",
                f"{grouped_step:.2f} s/step",
                ", ".join(f"{k[5:]} {grouped[k] / grouped['total'] * 100:.1f}%"
                          for k in ("time_generate", "time_train")),
            ),
            (
                "selfevolve update (score_loss, one forward per model)",
                f"{ours:,.0f} tokens/s",
                f"{tokens} labelled tokens per update",
            ),
            (
                "plain PyTorch loop, same loss and batch",
                f"{plain:,.0f} tokens/s",
                "per-attempt forwards, frozen reference copy",
            ),
        ],
        "ratios": [
            ("(sync + checkpoint) share of step time (target <= 0.05)", share("time_sync") + share("time_checkpoint")),
            ("update tokens/s, selfevolve / plain (target >= 0.9)", ours / plain),
            ("step time, y2_samples=4 / 1", grouped_step / per_step),
        ],
    }


if __name__ == "__main__":
    print(run())
