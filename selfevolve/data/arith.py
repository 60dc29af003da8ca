"""`arith`: the built-in, seeded task suite of the tiny world (docs/architecture.md, "The bundled tiny world").

A task is an integer expression of one-digit numbers joined by + and -, e.g.
"What is 7 + 8 - 3 + 4?" with reference "16". `difficulty` is the number of operators
(1 = "a + b", 2 = "a + b - c", 3 = "a + b - c + d", the default; difficulty 2 has about
290 test expressions, difficulty 3 about 5,250). Train, validation and test are disjoint
whatever their sizes: a hash of an expression's text puts it in exactly one split (10% test,
10% validation, 80% train), so no validation or test expression can ever be drawn for
`train` (or for the pretraining corpus, which the bundled `tiny` was trained on).

Solutions come in two styles, which gives recipes something to learn: `direct`
("The answer is 12.") asks the model for mental arithmetic over all operands at once,
which a small model gets wrong often; `steps` ("7 + 8 = 15. 15 - 3 = 12. The answer
is 12.") reduces it to one small operation per step, which it gets right more often.
"""

from __future__ import annotations

import hashlib
import random

from selfevolve.errors import UserError
from selfevolve.types import Task

SPLITS = ("train", "validation", "test")
FRACTIONS = {"test": 0.1, "validation": 0.1, "train": 0.8}


def split_of(expr: str) -> str:
    """The one split an expression belongs to (the old 20% test bucket, halved into test and
    validation, so neither was ever in the pretraining corpus)."""
    h = int.from_bytes(hashlib.sha256(expr.encode()).digest()[:8], "big") % 1000
    return "test" if h < 100 else "validation" if h < 200 else "train"


def random_expression(rng: random.Random, difficulty: int) -> tuple[list[int], list[str]]:
    nums = [rng.randint(1, 9) for _ in range(difficulty + 1)]
    ops = [rng.choice("+-") for _ in range(difficulty)]
    return nums, ops


def render(nums: list[int], ops: list[str]) -> str:
    out = str(nums[0])
    for op, n in zip(ops, nums[1:]):
        out += f" {op} {n}"
    return out


def evaluate(nums: list[int], ops: list[str]) -> int:
    acc = nums[0]
    for op, n in zip(ops, nums[1:]):
        acc = acc + n if op == "+" else acc - n
    return acc


def question(expr: str) -> str:
    return f"What is {expr}?"


def sample_problems(seed: int, split: str, n: int, difficulty: int = 3) -> list[tuple[list[int], list[str]]]:
    """`n` distinct problems of one split, drawn from a seeded stream."""
    if split not in SPLITS:
        raise UserError(f"arith has splits {SPLITS}, not {split!r}")
    rng = random.Random(f"arith:{seed}:{difficulty}")
    available = 9 ** (difficulty + 1) * 2 ** difficulty
    most = int(available * FRACTIONS[split] * 0.9)
    if n > most:
        raise UserError(f"data=arith difficulty={difficulty} has about {most} distinct {split} tasks, not {n}: "
                        "ask for fewer (limit=) or a higher difficulty=")
    seen: set[str] = set()
    out = []
    while len(out) < n:
        nums, ops = random_expression(rng, difficulty)
        expr = render(nums, ops)
        if expr in seen or split_of(expr) != split:
            continue
        seen.add(expr)
        out.append((nums, ops))
    return out


def tasks(split: str = "test", n: int = 500, seed: int = 0, difficulty: int = 3) -> list[Task]:
    """The `arith` tasks of one split.

    >>> t = tasks("test", n=2, seed=0)
    >>> t[0].prompt.startswith("What is "), t[0].reference.lstrip("-").isdigit()
    (True, True)
    >>> sets = [{x.prompt for x in tasks(s, 300)} for s in SPLITS]
    >>> sets[0] & sets[1], sets[0] & sets[2], sets[1] & sets[2]
    (set(), set(), set())
    """
    out = []
    for i, (nums, ops) in enumerate(sample_problems(seed, split, n, difficulty)):
        expr = render(nums, ops)
        out.append(Task(id=f"arith-d{difficulty}-s{seed}-{split}-{i}", prompt=question(expr),
                        reference=str(evaluate(nums, ops)),
                        meta={"expression": expr, "difficulty": difficulty}))
    return out


# --- solutions (used by the pretraining corpus and by tests) ---------------------------

def final_line(answer: int) -> str:
    return f"The answer is {answer}."


def direct_solution(nums: list[int], ops: list[str], answer: int | None = None) -> str:
    return final_line(evaluate(nums, ops) if answer is None else answer)


def step_solution(nums: list[int], ops: list[str], slip_at: int | None = None,
                  rng: random.Random | None = None) -> str:
    """One operation per sentence. `slip_at=k` makes step k wrong by a small amount (a
    realistic draft error) and carries the wrong value forward."""
    acc = nums[0]
    parts = []
    for k, (op, n) in enumerate(zip(ops, nums[1:])):
        new = acc + n if op == "+" else acc - n
        if k == slip_at:
            new += (rng or random).choice([-10, -2, -1, 1, 2, 10])
        parts.append(f"{acc} {op} {n} = {new}.")
        acc = new
    parts.append(final_line(acc))
    return " ".join(parts)


def wrong_answer(answer: int, rng: random.Random) -> int:
    """A plausible wrong answer: off by a carry, a digit, or a sign-preserving slip."""
    return answer + rng.choice([-20, -10, -2, -1, 1, 2, 10, 20])
