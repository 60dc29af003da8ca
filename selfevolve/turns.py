"""Turn policies: what happens between two attempts, the loop's one seam.

After each attempt the loop hands the still-going traces to its turn policy, which returns,
for each, the user message that asks for the next attempt, or None to end the episode (and
may write the latest turn's `critique` on the way). The built-in ones:

    Instruction(text)          always the same instruction: SCoRe's second turn, intrinsic
                               self-correction (the loop's default, SCORE_INSTRUCTION)
    Critique(critic)           a critic's text (SELF / Self-Refine, a judge, a verifier's
                               words through VerifierCritic); a "correct" verdict ends it
    Reflexion(critic, window)  Critique with only the last `window` attempts shown; the
                               critic's notes carry its critiques of the older ones
    StopWhenCorrect(inner)     oracle stopping: a verifier score of 1 ends the episode, the
                               rest go to `inner` (never in evaluation: the verifier would
                               steer the policy)

A policy's `window` (None: every attempt) is how many of the latest attempts the next
prompt shows. The loop keeps the messages it was given: a conversation is the task, then
each attempt and the message that followed it (`loop.conversation`).
"""

from __future__ import annotations

from selfevolve.feedback.prompts import REVISE_WITH_CRITIQUE, SCORE_INSTRUCTION
from selfevolve.types import Critic, Trace, Turn, TurnPolicy, as_critic


class Instruction:
    """The same user message after every attempt (SCoRe's `I`)."""

    def __init__(self, text: str = SCORE_INSTRUCTION, window: int | None = None):
        self.text, self.window = text, window

    def respond(self, traces: list[Trace]) -> list[str | None]:
        return [self.text] * len(traces)


class Critique:
    """A critic writes feedback on the latest attempt (stored as its `critique`); the next
    message is that text and a request to rewrite, or the episode ends on a "correct"
    verdict. An empty critique falls back to the plain instruction."""

    def __init__(self, critic: Critic, window: int | None = None, instruction: str = SCORE_INSTRUCTION):
        self.critic, self.window, self.instruction = as_critic(critic), window, instruction

    def message(self, turn: Turn) -> str:
        if turn.critique is not None and turn.critique.text:
            return REVISE_WITH_CRITIQUE.format(critique=turn.critique.text)
        return self.instruction

    def respond(self, traces: list[Trace]) -> list[str | None]:
        fbs = self.critic.critique_batch([t.task for t in traces], [t.turns for t in traces])
        for t, fb in zip(traces, fbs):
            t.turns[-1].critique = fb
        return [None if fb.verdict == "correct" else self.message(t.turns[-1]) for t, fb in zip(traces, fbs)]


class Reflexion(Critique):
    """Reflexion-style memory (Shinn et al., arXiv 2303.11366): the next prompt shows only the
    last `window` attempts, and the critic (its `memory=`) carries its notes on the rest."""

    def __init__(self, critic: Critic, window: int = 1, instruction: str = SCORE_INSTRUCTION):
        super().__init__(critic, window, instruction)


class StopWhenCorrect:
    """Oracle stopping: a trace whose latest turn the verifier scored 1 ends; `inner` decides
    the rest (it is not asked about the stopped ones: no critique is written for them)."""

    def __init__(self, inner: TurnPolicy):
        self.inner, self.window = inner, inner.window

    def respond(self, traces: list[Trace]) -> list[str | None]:
        going = [i for i, t in enumerate(traces) if not (t.turns[-1].score is not None and t.turns[-1].score >= 1.0)]
        out: list[str | None] = [None] * len(traces)
        for i, m in zip(going, self.inner.respond([traces[i] for i in going]) if going else []):
            out[i] = m
        return out


def as_turn_policy(obj: TurnPolicy | Critic | None) -> TurnPolicy:
    """None: the plain instruction; a Critic: its critique; a TurnPolicy: itself."""
    if obj is None:
        return Instruction()
    if callable(getattr(obj, "respond", None)):
        return obj
    return Critique(obj)
