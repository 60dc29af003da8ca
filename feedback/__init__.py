"""Critics and prompt templates (installed as `selfevolve.feedback`)."""

from selfevolve.feedback.critics import CRITICS, JudgeCritic, SelfCritic, VerifierCritic, get_critic
from selfevolve.feedback.prompts import REVISE_WITH_CRITIQUE, SCORE_INSTRUCTION

__all__ = ["SelfCritic", "JudgeCritic", "VerifierCritic", "get_critic", "CRITICS", "SCORE_INSTRUCTION",
           "REVISE_WITH_CRITIQUE"]
