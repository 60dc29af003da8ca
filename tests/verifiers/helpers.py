"""Verifiers that misbehave on purpose, importable by the pool's worker processes."""

import os
import time

from selfevolve.types import Feedback


class Misbehaving:
    """Response "sleep" hangs, "crash" kills the worker, "raise" raises; else scores 1 iff
    the response equals the reference."""

    def verify(self, task, response):
        if response == "sleep":
            time.sleep(60)
        if response == "crash":
            os._exit(3)
        if response == "raise":
            raise ValueError("bad input")
        return Feedback(score=float(response == task.reference), text="ok")

    def verify_batch(self, tasks, responses):
        return [self.verify(t, r) for t, r in zip(tasks, responses)]


def length_reward(prompts, completions, **kwargs):
    """A TRL-style reward function: shorter completions score higher."""
    return [1.0 / (1 + len(c)) for c in completions]
