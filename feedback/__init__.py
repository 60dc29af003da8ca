"""Critics and prompt templates (installed as `selfevolve.feedback`)."""

from .prompts import REVISE_WITH_CRITIQUE, SCORE_INSTRUCTION

__all__ = ["SCORE_INSTRUCTION", "REVISE_WITH_CRITIQUE"]
