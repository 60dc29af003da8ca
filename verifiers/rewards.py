"""Reward functions in TRL's shape, both ways.

TRL's contract is a plain function `f(prompts, completions, **kwargs) -> list[float]`
where dataset columns arrive as keyword lists. `RewardFunctionVerifier(f)` makes such a
function a selfevolve Verifier; `reward_function(verifier)` (and calling any selfevolve
verifier directly) goes the other way, so reward code moves between TRL and selfevolve.
"""

from __future__ import annotations

from typing import Any, Callable

from selfevolve.types import Feedback, Task


def _text(completion: Any) -> str:
    """TRL passes plain strings, or conversations (a list of messages) for chat data."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


def _columns(tasks: list[Task]) -> dict[str, list]:
    cols: dict[str, list] = {"reference": [t.reference for t in tasks], "answer": [t.reference for t in tasks],
                             "task_id": [t.id for t in tasks], "tests": [t.tests for t in tasks],
                             "entry_point": [t.entry_point for t in tasks]}
    for key in {k for t in tasks for k in t.meta}:
        cols.setdefault(key, [t.meta.get(key) for t in tasks])
    return cols


class RewardFunctionVerifier:
    """A TRL-style reward function as a Verifier. The task's reference arrives as the
    `reference` and `answer` columns, its meta fields as columns of their own.

    >>> def exact(prompts, completions, answer, **kw):
    ...     return [float(c.strip() == a) for c, a in zip(completions, answer)]
    >>> RewardFunctionVerifier(exact).verify(Task(id="t", prompt="2+2?", reference="4"), " 4").score
    1.0
    """

    def __init__(self, fn: Callable[..., list[float]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward_function")

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        scores = self.fn([t.prompt for t in tasks], list(responses), **_columns(tasks))
        if len(scores) != len(tasks):
            raise ValueError(f"reward function {self.name} returned {len(scores)} scores for {len(tasks)} completions")
        return [Feedback(score=None if s is None else float(s), text=f"{self.name} = {s}",
                         details={"reward_function": self.name}) for s in scores]

    def verify(self, task: Task, response: str) -> Feedback:
        return self.verify_batch([task], [response])[0]


def reward_function(verifier) -> Callable[..., list[float]]:
    """A selfevolve Verifier as a TRL reward function. Columns used: `reference` or
    `answer` (gold), `tests`, `entry_point`, `task_id`.

    >>> from selfevolve.verifiers import NumericVerifier
    >>> f = reward_function(NumericVerifier())
    >>> f(["What is 2 + 2?"], ["The answer is 4."], answer=["4"])
    [1.0]
    """

    def fn(prompts: list, completions: list, **columns) -> list[float]:
        gold = columns.get("reference", columns.get("answer", [None] * len(prompts)))
        tasks = []
        for i, p in enumerate(prompts):
            col = lambda k: columns[k][i] if k in columns and columns[k] is not None else None  # noqa: E731
            tasks.append(Task(id=str(col("task_id") or i), prompt=_text(p),
                              reference=None if gold[i] is None else str(gold[i]), tests=col("tests"),
                              entry_point=col("entry_point")))
        return [float(fb.score or 0.0) for fb in verifier.verify_batch(tasks, [_text(c) for c in completions])]

    fn.__name__ = f"{getattr(verifier, 'name', type(verifier).__name__)}_reward"
    return fn
