"""Can a model check an `equations` answer? The probe behind the README's table (SCoRe,
"A task where checking is easier than solving"); not a speed benchmark.

    python bench/probe_checks.py runs/pretrain-eq/model 300 2     # model, tasks, difficulty

Each validation equation gets a forced first answer, wrong (another digit) or right, then
SCoRe's instruction; the second turn is sampled at temperature 1. Prints how often it checks
("Check x = ...") and how often a check ends right (the numeric verifier).
"""

from __future__ import annotations

import random
import sys

from selfevolve import arith, equations
from selfevolve.feedback.prompts import SCORE_INSTRUCTION
from selfevolve.policies import HFPolicy
from selfevolve.types import SamplingParams
from selfevolve.verifiers.numeric import NumericVerifier


def main(model: str, n: int, difficulty: int) -> None:
    policy, verifier = HFPolicy(model, device="cpu", batch_size=64), NumericVerifier()
    tasks = equations.tasks("validation", n=n, seed=0, difficulty=difficulty)
    rng = random.Random(0)
    for wrong in (True, False):
        drafts = [equations.wrong_guess(int(t.reference), rng) if wrong else int(t.reference) for t in tasks]
        convs = [[{"role": "user", "content": t.prompt}, {"role": "assistant", "content": arith.final_line(g)},
                  {"role": "user", "content": SCORE_INSTRUCTION}] for t, g in zip(tasks, drafts)]
        outs = [o[0].response for o in policy.generate(convs, SamplingParams(temperature=1.0, max_new_tokens=96,
                                                                              seed=1))]
        checked = [(t, o) for t, o in zip(tasks, outs) if o.startswith("Check")]
        right = sum(verifier.verify(t, o).score for t, o in checked)
        print(f"after a {'wrong' if wrong else 'right'} draft: checks {len(checked) / n:.2f}, "
              f"right when checking {right / max(1, len(checked)):.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
