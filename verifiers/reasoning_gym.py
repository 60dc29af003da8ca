"""reasoning-gym's own scorers, for tasks from `data=reasoning_gym:NAME` (selfevolve/data/sources.py)."""

from __future__ import annotations

from selfevolve.types import Feedback, Task


class ReasoningGymVerifier:
    """`score_answer(answer, entry)` of the task's family, in [0, 1] (some families give
    partial credit). The answer handed to it is what follows the last "answer is" in the
    response (selfevolve's answer format), else the whole response."""

    name = "reasoning_gym"

    def verify(self, task: Task, response: str) -> Feedback:
        entry = task.meta.get("reasoning_gym")
        if not isinstance(entry, dict):
            return Feedback(score=0.0, text="not a reasoning-gym task (data=reasoning_gym:NAME)")
        from reasoning_gym import get_score_answer_fn

        at = response.lower().rfind("answer is")
        answer = (response[at + len("answer is"):] if at >= 0 else response).strip().removesuffix(".").strip()
        score = float(get_score_answer_fn(entry["metadata"]["source_dataset"])(answer, entry))
        return Feedback(score=score, text=f"reasoning-gym scored {answer!r}: {score:g}", details={"answer": answer})

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        return [self.verify(t, r) for t, r in zip(tasks, responses)]
