"""`equations`: find the hidden operand of an `arith` expression, the tiny-world task where
checking an answer is easier than producing it.

"Find x: 2 + x - 3 = 4." has the reference "5". Solving it means running the arithmetic
backwards (x = 4 + 3 - 2) in one go, and the pretraining corpus teaches it only in the
direct style ("The answer is 5."). Checking a candidate is the forward arithmetic `arith`
already teaches step by step. x only ever opens the expression or follows a "+", so the left
side grows with x, and a wrong candidate is fixed by one subtraction and one addition:

    Check x = 8 in 2 + x - 3 = 4: 2 + 8 - 3 = 10 - 3 = 7, not 4. 7 - 4 = 3, so x = 8 - 3 = 5.
    The answer is 5.

Every running value of an equation (its left side evaluated left to right with the right x,
and so its right side) is a digit, 0 to 9, so a check's numbers stay within a digit's
distance of the small sums and differences `arith` teaches most (why, with the probes'
numbers: docs/experiments.md).

On `arith`, a second attempt can only resample, so SCoRe's bonus is cheapest to earn by
answering worse first. Here a second attempt has something to find.

An equation belongs to the split of the expression it hides an operand of (`arith.split_of`),
so `equations` and `arith` share one train / validation / test partition of expressions.
"""

from __future__ import annotations

import random

from selfevolve.data import arith
from selfevolve.errors import UserError
from selfevolve.types import Task

X = "x"


def hideable(ops: list[str]) -> list[int]:
    """Operand positions x may take: the first, or one that follows a '+'."""
    return [0] + [k + 1 for k, op in enumerate(ops) if op == "+"]


def render(nums: list[int], ops: list[str], hidden: int) -> str:
    """The equation's text, e.g. "2 + x - 3 = 4"."""
    left = arith.render(nums, ops).split(" ")
    left[2 * hidden] = X
    return f"{' '.join(left)} = {arith.evaluate(nums, ops)}"


def question(equation: str) -> str:
    return f"Find {X}: {equation}."


def small(nums: list[int], ops: list[str]) -> bool:
    """Whether every running value of the expression is a digit (0 to 9)."""
    return all(0 <= arith.evaluate(nums[:k + 1], ops[:k]) <= 9 for k in range(len(nums)))


def random_problem(rng: random.Random, difficulty: int) -> tuple[list[int], list[str], int]:
    """An equation with `difficulty` operators and digit running values: (nums, ops, hidden
    index), uniform over such expressions, x uniform over the positions it may take."""
    while True:
        nums, ops = arith.random_expression(rng, difficulty)
        if small(nums, ops):
            return nums, ops, rng.choice(hideable(ops))


def sample_problems(seed: int, split: str, n: int, difficulty: int = 3) -> list[tuple[list[int], list[str], int]]:
    """`n` distinct equations of one split, from a seeded stream: (nums, ops, hidden index)."""
    if split not in arith.SPLITS:
        raise UserError(f"equations has splits {arith.SPLITS}, not {split!r}")
    rng = random.Random(f"equations:{seed}:{difficulty}")
    seen: set[str] = set()
    out, misses = [], 0
    while len(out) < n:
        nums, ops, hidden = random_problem(rng, difficulty)
        eq = render(nums, ops, hidden)
        if eq in seen or arith.split_of(arith.render(nums, ops)) != split:
            misses += 1
            if misses > 100_000:  # every equation of the split has been drawn, in all likelihood
                raise UserError(f"data=equations difficulty={difficulty} has about {len(out)} distinct {split} "
                                f"tasks, not {n}: ask for fewer (limit=) or a higher difficulty=")
            continue
        seen.add(eq)
        out.append((nums, ops, hidden))
        misses = 0
    return out


def tasks(split: str = "test", n: int = 500, seed: int = 0, difficulty: int = 3) -> list[Task]:
    """The `equations` tasks of one split.

    >>> t = tasks("test", n=1, seed=0)[0]
    >>> t.prompt.startswith("Find x: "), t.reference.isdigit()
    (True, True)
    """
    out = []
    for i, (nums, ops, hidden) in enumerate(sample_problems(seed, split, n, difficulty)):
        eq = render(nums, ops, hidden)
        out.append(Task(id=f"equations-d{difficulty}-s{seed}-{split}-{i}", prompt=question(eq),
                        reference=str(nums[hidden]), meta={"equation": eq, "difficulty": difficulty}))
    return out


def parts(task: Task) -> tuple[list[int], list[str], int]:
    """A task's operands (x filled in with the reference), operators and x's position."""
    toks = task.meta["equation"].split(" = ")[0].split(" ")
    hidden = toks[::2].index(X)
    toks[2 * hidden] = task.reference
    return [int(n) for n in toks[::2]], toks[1::2], hidden


# --- solutions (used by the pretraining corpus and by tests) ---------------------------


def check_solution(nums: list[int], ops: list[str], hidden: int, guess: int) -> str:
    """Substitute `guess`, evaluate, and correct it by the gap to the right side: "Check x = 8
    in 2 + x - 3 = 4: 2 + 8 - 3 = 10 - 3 = 7, not 4. 7 - 4 = 3, so x = 8 - 3 = 5. The answer
    is 5." A right guess is confirmed ("Check x = 5 in 2 + x - 3 = 4: 2 + 5 - 3 = 7 - 3 = 4.
    The answer is 5.").

    The check restates the equation and evaluates it as a chain that rewrites the rest of the
    expression at every step, so each step's operands are the first two numbers just before
    it (a small model copies numbers well but misses a step when it must find its operand in
    the question; the probes: docs/experiments.md). The right side stands next to the value it
    is compared with, and the gap is the larger minus the smaller number in the forward forms
    `arith` teaches (never "a - -b"), so it is always positive."""
    target = arith.evaluate(nums, ops)
    tried = nums[:hidden] + [guess] + nums[hidden + 1:]
    value = arith.evaluate(tried, ops)
    chain = [arith.render(tried, ops)]
    for k in range(len(ops)):
        chain.append(arith.render([arith.evaluate(tried[:k + 2], ops[:k + 1])] + tried[k + 2:], ops[k + 1:]))
    out = f"Check {X} = {guess} in {render(nums, ops, hidden)}: {' = '.join(chain)}"
    if value != target:
        hi, lo = max(target, value), min(target, value)
        gap = f"{hi} - {lo}" if lo >= 0 else f"{hi} + {-lo}"
        sign = "+" if target > value else "-"
        out += f", not {target}. {gap} = {hi - lo}, so {X} = {guess} {sign} {hi - lo} = {guess + target - value}"
    return f"{out}. {arith.final_line(guess + target - value)}"


def wrong_guess(answer: int, rng: random.Random) -> int:
    """Another digit (1 to 9), a draft's plausible wrong answer, at a distance from `answer`
    drawn uniformly from those possible. A check's gap is that distance, so the corpus gives
    the gap no prior to guess from: with uniform wrong digits, a gap of 1 was 8 times as
    common as a gap of 8, and a 1.9M model learned to write the prior (docs/experiments.md)."""
    distance = rng.choice([d for d in range(1, 9) if answer - d >= 1 or answer + d <= 9])
    return rng.choice([g for g in (answer - distance, answer + distance) if 1 <= g <= 9])
