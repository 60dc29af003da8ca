"""Numeric answers: extract the final answer a model wrote and compare it with the task's
reference as a number.

Extraction looks for the formats models write, in order: "The answer is X", GSM8K's
"#### X", and `\\boxed{X}`. Several *different* final answers score 0 (hedging is not
rewarded); the last-number fallback is off by default because it rewards answers that
merely mention the right number.
"""

from __future__ import annotations

import re
from fractions import Fraction

from selfevolve.types import Feedback, Task

NUMBER = r"[-+]?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
PATTERNS = [
    re.compile(r"[Tt]he (?:final )?answer is:?\s*\$?(" + NUMBER + r")"),
    re.compile(r"####\s*(" + NUMBER + r")"),
    re.compile(r"\\boxed\{\s*(" + NUMBER + r")\s*\}"),
]


def parse_number(text: str) -> Fraction | None:
    """'1,234' -> 1234, '-3.5' -> -7/2, '2/3' -> 2/3; None if not a number.

    >>> parse_number("1,234"), parse_number("-3.5"), parse_number("x")
    (Fraction(1234, 1), Fraction(-7, 2), None)
    """
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answers(response: str, last_number_fallback: bool = False) -> list[str]:
    """Every final answer the response states, in order.

    >>> extract_answers("12 + 30 = 42. The answer is 42.")
    ['42']
    >>> extract_answers("I think 41", last_number_fallback=True)
    ['41']
    """
    for pat in PATTERNS:
        found = pat.findall(response)
        if found:
            return found
    if last_number_fallback:
        nums = re.findall(NUMBER, response)
        return nums[-1:]
    return []


class NumericVerifier:
    """Score 1 iff the response states exactly one final answer, numerically equal to
    `task.reference`.

    >>> v = NumericVerifier()
    >>> task = Task(id="t", prompt="What is 12 + 30?", reference="42")
    >>> v.verify(task, "12 + 30 = 42. The answer is 42.").score
    1.0
    >>> v.verify(task, "The answer is 41.").score
    0.0
    >>> v.verify(task, "The answer is 41. The answer is 42.").score
    0.0
    """

    name = "numeric"

    def __init__(self, last_number_fallback: bool = False):
        self.last_number_fallback = last_number_fallback

    def verify(self, task: Task, response: str) -> Feedback:
        if task.reference is None:
            raise ValueError(f"task {task.id} has no reference answer to verify against")
        gold = parse_number(task.reference)
        if gold is None:
            raise ValueError(f"task {task.id}: reference {task.reference!r} is not a number")
        answers = extract_answers(response, self.last_number_fallback)
        values = {parse_number(a) for a in answers} - {None}
        if not values:
            return Feedback(score=0.0, text="no final answer found", details={"answers": answers})
        if len(values) > 1:
            return Feedback(score=0.0, text=f"several different final answers: {answers}", details={"answers": answers})
        (got,) = values
        ok = got == gold
        return Feedback(score=1.0 if ok else 0.0, text="correct" if ok else f"wrong answer {answers[-1]}",
                        details={"answers": answers})

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        return [self.verify(t, r) for t, r in zip(tasks, responses)]
