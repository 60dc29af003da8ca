"""Can a second look correct? The precondition issue 44 sets before any SCoRe run on a world
whose first answers are direct and whose second turns may re-derive step by step
(`recipe=pretrain p_direct=1 p_recheck=...`); not a speed benchmark. docs/experiments.md,
"A second look that re-derives", has its results.

    python bench/probe_second_look.py MODEL [N] [DIFFICULTY]     # e.g. runs/pretrain-look/model 300 3

On N validation `arith` tasks, SCoRe's two attempts (its instruction between):

- greedy, as evaluations run: acc_t1, acc_t2, delta with i→c and c→i, and how often the second
  attempt re-derives (is written as steps);
- sampled at T = 1, as SCoRe's rollouts are: first-attempt accuracy; after the model's own
  wrong first attempts and after its right ones, how often the second re-derives and how
  often it is right.

The precondition: at T = 1 a second attempt after an own wrong first is right clearly more
often than a first attempt is (and than a fresh first attempt on the same tasks, what
resampling gives), and the greedy delta is not already positive.
"""

from __future__ import annotations

import sys

from probe_steps import STEP, rate, two_turn

from selfevolve.data import arith
from selfevolve.policies import HFPolicy
from selfevolve.types import SamplingParams
from selfevolve.verifiers import get_verifier


def main(model: str, n: int = 300, difficulty: int = 3) -> None:
    policy, verifier = HFPolicy(model, device="cpu", batch_size=64), get_verifier("numeric")
    tasks = arith.tasks("validation", n=n, seed=0, difficulty=difficulty)
    convs = [[{"role": "user", "content": t.prompt}] for t in tasks]

    def right(t, text: str) -> bool:
        return verifier.verify(t, text).score == 1.0

    for name, sampling in (("greedy", SamplingParams(temperature=0.0, max_new_tokens=96)),
                           ("T = 1", SamplingParams(temperature=1.0, max_new_tokens=96, seed=1))):
        first = [o[0].response for o in policy.generate(convs, sampling)]
        second_sampling = sampling.model_copy(update={"seed": 2}) if sampling.temperature else sampling
        second = [o[0].response for o in policy.generate([two_turn(t, f) for t, f in zip(tasks, first)],
                                                         second_sampling)]
        r1 = [right(t, f) for t, f in zip(tasks, first)]
        r2 = [right(t, s) for t, s in zip(tasks, second)]
        steps = [bool(STEP.search(s)) for s in second]
        i2c = sum(not a and b for a, b in zip(r1, r2)) / n
        c2i = sum(a and not b for a, b in zip(r1, r2)) / n
        print(f"{name}: acc_t1 {sum(r1) / n:.3f}, acc_t2 {sum(r2) / n:.3f}, delta {(sum(r2) - sum(r1)) / n:+.3f} "
              f"(i2c {i2c:.3f}, c2i {c2i:.3f}); first written as steps {rate(bool(STEP.search(f)) for f in first)}")
        for was in (False, True):
            idx = [i for i in range(n) if r1[i] == was]
            print(f"  after an own {'right' if was else 'wrong'} first: re-derives {rate(steps[i] for i in idx)}, "
                  f"right {rate(r2[i] for i in idx)}, right when re-deriving "
                  f"{rate(r2[i] for i in idx if steps[i])}")
        if sampling.temperature:  # against a first attempt, and against resampling the same tasks
            wrong = [i for i in range(n) if not r1[i]]
            fresh = policy.generate([convs[i] for i in wrong], sampling,  # seeds no attempt above used
                                    seeds=[sampling.seed + 2 * n + i for i in wrong])
            print(f"precondition: second after an own wrong first {rate(r2[i] for i in wrong)} vs a first "
                  f"attempt {sum(r1) / n:.3f} and vs a fresh first attempt on those tasks "
                  f"{rate(right(tasks[i], o[0].response) for i, o in zip(wrong, fresh))} (T = 1)")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
