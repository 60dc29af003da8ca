"""Simple verifiers: exact string match, regex, multiple choice."""

from __future__ import annotations

import re
import unicodedata

from selfevolve.types import Feedback, Task


def normalize(s: str) -> str:
    """Case-, space- and punctuation-insensitive form used by `exact`.

    >>> normalize("  The  Eiffel Tower. ")
    'the eiffel tower'
    """
    s = unicodedata.normalize("NFKC", s).lower().strip()
    s = re.sub(r"\s+", " ", s)
    return s.strip(" .!?\"'")


def final_text(response: str) -> str:
    """The stated final answer ("The answer is X", "#### X", \\boxed{X}) or the whole text."""
    m = re.findall(r"(?:[Tt]he (?:final )?answer is:?|####)\s*(.+?)\s*$", response, re.M)
    return m[-1] if m else response


class ExactVerifier:
    """Normalised exact match of the final answer against `task.reference`.

    >>> task = Task(id="t", prompt="Capital of France?", reference="Paris")
    >>> ExactVerifier().verify(task, "The answer is paris.").score
    1.0
    """

    name = "exact"

    def verify(self, task: Task, response: str) -> Feedback:
        got = normalize(final_text(response))
        ok = bool(got) and got == normalize(task.reference or "")
        return Feedback(score=float(ok), text="correct" if ok else f"expected a different answer, got {got[:80]!r}",
                        details={"answer": got})

    def verify_batch(self, tasks, responses):
        return [self.verify(t, r) for t, r in zip(tasks, responses)]


class RegexVerifier:
    """Score 1 iff the response matches the task's pattern (`task.reference`, or
    `task.meta["pattern"]`), with re.search.

    >>> RegexVerifier().verify(Task(id="t", prompt="A date?", reference=r"\\d{4}-\\d{2}-\\d{2}"), "2024-01-31").score
    1.0
    """

    name = "regex"

    def verify(self, task: Task, response: str) -> Feedback:
        pattern = task.meta.get("pattern") or task.reference
        if not pattern:
            raise ValueError(f"task {task.id} has no pattern (reference or meta.pattern)")
        ok = re.search(pattern, response) is not None
        return Feedback(score=float(ok), text="matches" if ok else f"does not match /{pattern}/")

    def verify_batch(self, tasks, responses):
        return [self.verify(t, r) for t, r in zip(tasks, responses)]


class ChoiceVerifier:
    """Multiple choice: the response must name exactly one option letter (A-J), equal to
    `task.reference`. Naming several letters scores 0.

    >>> v = ChoiceVerifier()
    >>> t = Task(id="t", prompt="Pick one", reference="B")
    >>> v.verify(t, "The answer is (B).").score, v.verify(t, "A or B").score
    (1.0, 0.0)
    """

    name = "choice"

    def verify(self, task: Task, response: str) -> Feedback:
        gold = (task.reference or "").strip().strip("()").upper()
        stated = final_text(response)
        letters = set(re.findall(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])", stated))
        if len(letters) != 1:
            return Feedback(score=0.0,
                            text="no single option chosen" if not letters else f"several options: {sorted(letters)}")
        (got,) = letters
        return Feedback(score=float(got == gold), text="correct" if got == gold else f"chose {got}")

    def verify_batch(self, tasks, responses):
        return [self.verify(t, r) for t, r in zip(tasks, responses)]


__all__ = ["ExactVerifier", "RegexVerifier", "ChoiceVerifier"]
