"""Is checking local in the steps world? The probe issue 35 asks for before any training;
not a speed benchmark. docs/experiments.md, "A world where checking is local", has its
results.

    python bench/probe_steps.py MODEL [N] [DIFFICULTY]     # e.g. tiny 300 3

On N validation `arith` tasks, answered in the steps style ("7 + 8 = 15. 15 - 3 = 12. ...
The answer is 12."), one operation a step:

- greedy first attempt: accuracy, and the share written as steps;
- teacher-forced on the right chain: how often the greedy token is right at each step's
  result (producing one step, the model's local skill);
- teacher-forced on a second turn that rewrites a draft with one slipped step (SCoRe's
  instruction between): how often the greedy result is right at the slipped step, where
  the draft shows a wrong value — the per-step check — and at the steps before it (copy
  the right prefix) and after it;
- sampled at T = 1, as SCoRe's rollouts are: after the model's own wrong first attempts
  (T = 1), and after forced one-slip drafts, how often the second attempt is right.

The condition for training SCoRe (issue 35): a second attempt after a wrong first right
more often than the greedy first attempt is.
"""

from __future__ import annotations

import random
import re
import sys
from collections import defaultdict

import torch

from selfevolve.data import arith
from selfevolve.feedback.prompts import SCORE_INSTRUCTION
from selfevolve.policies import HFPolicy
from selfevolve.types import SamplingParams
from selfevolve.verifiers import get_verifier

STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)\.")


def two_turn(task, draft: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": draft},
            {"role": "user", "content": SCORE_INSTRUCTION}]


def results_right(policy: HFPolicy, messages: list[dict[str, str]], answer: str) -> list[bool]:
    """Teacher-forced on `answer` after `messages`: per step of it, whether the greedy
    tokens at the step's result are the result it writes."""
    tok = policy.tokenizer
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
    with torch.no_grad():
        greedy = policy.model(torch.tensor([enc["input_ids"]])).logits[0].argmax(-1)
    out = []
    for m in STEP.finditer(answer):
        lo, hi = len(prompt) + m.start(4), len(prompt) + m.end(4)
        toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo]
        out.append(all(int(greedy[i - 1]) == enc["input_ids"][i] for i in toks))
    return out


def rate(xs) -> str:
    xs = list(xs)
    return f"{sum(xs) / max(1, len(xs)):.3f} (n={len(xs)})"


def main(model: str, n: int = 300, difficulty: int = 3) -> None:
    policy, verifier = HFPolicy(model, device="cpu", batch_size=64), get_verifier("numeric")
    tasks = arith.tasks("validation", n=n, seed=0, difficulty=difficulty)
    parts = [(list(map(int, re.findall(r"\d+", t.meta["expression"]))), re.findall(r" ([+-]) ", t.meta["expression"]))
             for t in tasks]
    convs = [[{"role": "user", "content": t.prompt}] for t in tasks]

    greedy = [o[0].response for o in policy.generate(convs, SamplingParams(temperature=0.0, max_new_tokens=96))]
    right = [verifier.verify(t, g).score == 1.0 for t, g in zip(tasks, greedy)]
    print(f"greedy first attempt: acc {rate(right)}, written as steps {rate(bool(STEP.search(g)) for g in greedy)}")

    step_right = defaultdict(list)
    for t, (nums, ops) in zip(tasks, parts):
        for k, ok in enumerate(results_right(policy, [{"role": "user", "content": t.prompt}],
                                             arith.step_solution(nums, ops))):
            step_right[k + 1].append(ok)
    print("teacher-forced right chain, greedy right at: "
          + ", ".join(f"step {k} {rate(v)}" for k, v in sorted(step_right.items())))

    rng = random.Random(0)
    slips = [rng.randrange(len(ops)) for _, ops in parts]
    drafts = [arith.step_solution(nums, ops, slip_at=s, rng=rng) for (nums, ops), s in zip(parts, slips)]
    where = defaultdict(list)
    for t, (nums, ops), s, d in zip(tasks, parts, slips, drafts):
        for k, ok in enumerate(results_right(policy, two_turn(t, d), arith.step_solution(nums, ops))):
            where["before the slip" if k < s else "at the slip" if k == s else "after the slip"].append(ok)
    print("teacher-forced correction of a one-slip draft, greedy right: "
          + ", ".join(f"{k} {rate(v)}" for k, v in where.items()))

    t1 = SamplingParams(temperature=1.0, max_new_tokens=96, seed=1)
    first = [o[0].response for o in policy.generate(convs, t1)]
    wrong = [i for i, (t, f) in enumerate(zip(tasks, first)) if verifier.verify(t, f).score != 1.0]
    seconds = policy.generate([two_turn(tasks[i], first[i]) for i in wrong], t1.model_copy(update={"seed": 2}))
    fixed = [verifier.verify(tasks[i], s[0].response).score == 1.0 for i, s in zip(wrong, seconds)]
    print(f"T = 1: first attempt acc {rate(i not in set(wrong) for i in range(n))}; "
          f"second attempt right after an own wrong first {rate(fixed)}")
    seconds = policy.generate([two_turn(t, d) for t, d in zip(tasks, drafts)], t1.model_copy(update={"seed": 3}))
    print("T = 1: second attempt right after a forced one-slip draft "
          + rate(verifier.verify(t, s[0].response).score == 1.0 for t, s in zip(tasks, seconds)))
    print(f"condition (second after a wrong first > greedy first): {sum(fixed) / max(1, len(fixed)):.3f} "
          f"vs {sum(right) / n:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
