"""Can a model check an `equations` answer? The probe behind docs/experiments.md's table (SCoRe,
"A task where checking is easier than solving"); not a speed benchmark.

    python bench/probe_checks.py runs/pretrain-eq/model 300 3     # model, tasks, difficulty

Each validation equation gets a forced wrong (another digit) or right first answer, then
SCoRe's instruction. Two measurements of the second turn:

- sampled at temperature 1, as SCoRe's rollouts are: how often it checks ("Check x = ..."),
  how often a check ends right, and how often the second answer is right at all (the
  numeric verifier);
- teacher-forced on the right check of the wrong draft and of the right one: how often the
  greedy next token is right at every number the check computes (each step of the chain,
  the gap, the corrected x, the final answer) and at its verdict ("." or ", not"), so a
  failing check can be traced to the step that fails; and where the chain's last value
  comes from (the arithmetic, or the right side it is compared with), also with the right
  side changed to another digit.
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter, defaultdict

import torch

from selfevolve.data import arith, equations
from selfevolve.feedback.prompts import SCORE_INSTRUCTION
from selfevolve.policies import HFPolicy
from selfevolve.types import SamplingParams
from selfevolve.verifiers.numeric import NumericVerifier


def conversation(task, draft: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": arith.final_line(draft)},
            {"role": "user", "content": SCORE_INSTRUCTION}]


def computed_numbers(check: str) -> list[tuple[str, int, int]]:
    """(role, start, end) of each number the check computes rather than copies (the final
    answer copies the draft or the corrected x, but must pick which), and of its verdict: the
    character after the chain, "." (the draft is right) or "," (", not 4")."""
    out = []
    chain = re.search(r": (.*?)(?:, not|\. The)", check)
    for k, m in enumerate(re.finditer(r" = (-?\d+)", chain[1])):
        out.append((f"step {k + 1}", chain.start(1) + m.start(1), chain.start(1) + m.end(1)))
    out.append(("verdict", chain.end(1), chain.end(1) + 1))  # "." confirms the draft, "," goes on to "not"
    for role, pattern in (("gap", r"not -?\d+\. [^,]* = (\d+)"), ("corrected x", r"so x = [^=]* = (\d+)"),
                          ("answer", r"The answer is (-?\d+)")):
        if m := re.search(pattern, check):
            out.append((role, m.start(1), m.end(1)))
    return out


def greedy_numbers(policy: HFPolicy, task, draft: int, check: str) -> dict[str, tuple[str, str]]:
    """Teacher-forced on `check` after `draft`: at each number the check computes, (what the
    greedy model writes there, what the check says)."""
    tok = policy.tokenizer
    prompt = tok.apply_chat_template(conversation(task, draft), tokenize=False, add_generation_prompt=True)
    enc = tok(prompt + check, add_special_tokens=False, return_offsets_mapping=True)
    with torch.no_grad():
        greedy = policy.model(torch.tensor([enc["input_ids"]])).logits[0].argmax(-1)
    out = {}
    for role, lo, hi in computed_numbers(check):
        lo, hi = lo + len(prompt), hi + len(prompt)
        toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo]  # a sign's " -" too
        said = tok.decode(greedy[toks[0] - 1:toks[-1]]).strip()
        out[role] = (said[:1] if role == "verdict" else said, (prompt + check)[lo:hi])
    return out


def teacher_forced(policy: HFPolicy, tasks, drafts) -> dict[str, float]:
    right = defaultdict(list)
    for t, draft in zip(tasks, drafts):
        nums, ops, hidden = equations.parts(t)
        for role, (said, truth) in greedy_numbers(policy, t, draft, equations.check_solution(nums, ops, hidden,
                                                                                              draft)).items():
            right[role].append(said == truth)
    return {role: sum(v) / len(v) for role, v in right.items()}


def last_step(policy: HFPolicy, tasks, drafts, change: str = "") -> Counter:
    """Where the check's last chain value comes from: the arithmetic, the right side, or neither.
    `change="restated"` / `"both"` replaces the right side by another digit in the restated
    equation / there and in the question (for right drafts, whose last value is the right side)."""
    rng, sources = random.Random(1), Counter()
    for t, draft in zip(tasks, drafts):
        nums, ops, hidden = equations.parts(t)
        check, side = equations.check_solution(nums, ops, hidden, draft), t.meta["equation"].split(" = ")[1]
        if change:
            new = str(rng.choice([d for d in range(10) if str(d) != side]))
            head, rest = check.split(": ", 1)
            check, side = f"{head.rsplit(' = ', 1)[0]} = {new}: {rest}", new
            if change == "both":
                t = t.model_copy(update={"prompt": f"{t.prompt.rsplit(' = ', 1)[0]} = {new}."})
        said, truth = greedy_numbers(policy, t, draft, check)[f"step {len(ops)}"]
        sources["the arithmetic" if said == truth else "the right side" if said == side else
                "off by one" if said.lstrip("-").isdigit() and abs(int(said) - int(truth)) == 1 else "other"] += 1
    return sources


def main(model: str, n: int, difficulty: int) -> None:
    policy, verifier = HFPolicy(model, device="cpu", batch_size=64), NumericVerifier()
    tasks = equations.tasks("validation", n=n, seed=0, difficulty=difficulty)
    rng = random.Random(0)
    wrong_drafts = [equations.wrong_guess(int(t.reference), rng) for t in tasks]
    right_drafts = [int(t.reference) for t in tasks]
    for what, drafts in (("wrong", wrong_drafts), ("right", right_drafts)):
        outs = [o[0].response for o in policy.generate([conversation(t, d) for t, d in zip(tasks, drafts)],
                                                        SamplingParams(temperature=1.0, max_new_tokens=128, seed=1))]
        checked = [(t, o) for t, o in zip(tasks, outs) if o.startswith("Check")]
        right = sum(verifier.verify(t, o).score for t, o in checked)
        right_at_all = sum(verifier.verify(t, o).score for t, o in zip(tasks, outs))
        print(f"after a {what} draft: checks {len(checked) / n:.2f}, "
              f"right when checking {right / max(1, len(checked)):.2f}, right {right_at_all / n:.2f}")
    for what, drafts in (("wrong", wrong_drafts), ("right", right_drafts)):
        rates = teacher_forced(policy, tasks, drafts)
        print(f"teacher-forced check of a {what} draft, greedy token right at: "
              + ", ".join(f"{role} {rate:.2f}" for role, rate in rates.items()))
    for what, drafts, change in (("a wrong draft's check", wrong_drafts, ""),
                                 ("a right draft's check, right side changed in the restated equation", right_drafts,
                                  "restated"),
                                 ("a right draft's check, right side changed there and in the question", right_drafts,
                                  "both")):
        sources = last_step(policy, tasks, drafts, change)
        print(f"last chain value of {what}, teacher-forced: "
              + ", ".join(f"{k} {v / n:.2f}" for k, v in sources.most_common()))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
