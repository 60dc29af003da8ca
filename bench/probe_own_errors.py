"""Can a second look fix the errors a model's own derivations make? The evidence issue 44's
closing rests on; not a speed benchmark. docs/experiments.md, "Why `arith` cannot separate
SCoRe from its ablations", has its results.

    python bench/probe_own_errors.py MODEL [N] [DIFFICULTY]     # e.g. runs/pretrain-look3/model 300 4

On N validation `arith` tasks asked step by step ("Work it out step by step: ..."), greedy
and at T = 1:

- accuracy (the whole derivation right: steps and final line, stricter than acc_t1), and
  each wrong derivation's first error: `arith` (the step's operands are the question's and
  the running value, its result is wrong), `carry` (a step starts from another value),
  `lookup` (an operator or operand not the question's), `length` (too many or too few
  steps, a direct answer included), or `final` (the chain is right, the final line is not);
  text that does not parse as a step is skipped;
- of the first arithmetic slips, the share whose running value is negative (against the
  share among all steps written);
- after each such draft (shown as the answer to the plain question, as SCoRe's episodes
  are), SCoRe's instruction, and the right chain teacher-forced up to the slipped step:
  whether the greedy value the second turn writes there is right, the draft's slip again,
  or another value. That is what the pretrained weights compute at that step in the
  corpus's re-derivation format.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from probe_steps import STEP, rate, two_turn

from selfevolve.data import arith
from selfevolve.policies import HFPolicy
from selfevolve.recipes.pretrain import STEPS_QUESTION
from selfevolve.types import SamplingParams, Task


def first_error(nums: list[int], ops: list[str], text: str) -> tuple[str, int] | None:
    """The first error of a derivation and its step, or None when it is right."""
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(text)]
    acc = nums[0]
    for k, (a, op, b, c) in enumerate(steps):
        if k >= len(ops):
            return "length", k
        if a != acc:
            return "carry", k
        if op != ops[k] or b != nums[k + 1]:
            return "lookup", k
        if c != (a + b if op == "+" else a - b):
            return "arith", k
        acc = c
    if len(steps) < len(ops):
        return "length", len(steps)
    return None if text.rstrip().endswith(arith.final_line(acc)) else ("final", len(steps))


def value_at(policy: HFPolicy, messages: list[dict[str, str]], answer: str, k: int) -> str:
    """The greedy value written at step k's result, teacher-forced on `answer` up to it."""
    tok = policy.tokenizer
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start = list(STEP.finditer(answer))[k].start(4) - 1  # before the space: " -" is one token, " " another
    ids = tok(prompt + answer[:start], add_special_tokens=False)["input_ids"]
    out = ""
    with torch.no_grad():
        for _ in range(5):
            nxt = int(policy.model(torch.tensor([ids])).logits[0, -1].argmax())
            piece = tok.decode([nxt])
            if not (piece.isdigit() or (not out and piece in (" ", " -"))):
                break
            out, ids = out + piece, ids + [nxt]
    return out.strip()


def main(model: str, n: int = 300, difficulty: int = 3) -> None:
    policy = HFPolicy(model, device="cpu", batch_size=64)
    problems = arith.sample_problems(0, "validation", n, difficulty)
    convs = [[{"role": "user", "content": STEPS_QUESTION.format(expression=arith.render(*p))}] for p in problems]
    length = max(96, 20 * difficulty)  # a derivation's tokens, with room
    for name, sampling in (("greedy", SamplingParams(temperature=0.0, max_new_tokens=length)),
                           ("T = 1", SamplingParams(temperature=1.0, max_new_tokens=length, seed=1))):
        drafts = [o[0].response for o in policy.generate(convs, sampling)]
        errors = [first_error(nums, ops, d) for (nums, ops), d in zip(problems, drafts)]
        kinds = Counter(e[0] for e in errors if e)
        slips, second = [], Counter()
        for (nums, ops), draft, e in zip(problems, drafts, errors):
            if e and e[0] == "arith":
                a, op, b, c = STEP.findall(draft)[e[1]]
                slips.append(int(a) < 0)
                right = str(int(a) + int(b) if op == "+" else int(a) - int(b))
                task = Task(id="probe", prompt=arith.question(arith.render(nums, ops)))
                v = value_at(policy, two_turn(task, draft), arith.step_solution(nums, ops), e[1])
                second["right" if v == right else "the slip again" if v == c else "another value"] += 1
        negative = [int(a) < 0 for d in drafts for a, *_ in STEP.findall(d)]
        print(f"{name}: acc {rate(e is None for e in errors)}; wrong derivations by first error {dict(kinds)}; "
              f"running value negative at {rate(slips)} of the arithmetic slips (of all steps: {rate(negative)}); "
              f"second turn teacher-forced to the slip writes {dict(second)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
