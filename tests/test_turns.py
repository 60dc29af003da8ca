"""The turn-policy seam (selfevolve/turns.py) on the real tiny model: what each policy puts
between attempts reaches the model, and each stops where it says."""

from selfevolve.data import arith
from selfevolve.feedback import VerifierCritic
from selfevolve.feedback.prompts import REVISE_WITH_CRITIQUE, SCORE_INSTRUCTION
from selfevolve.loop import refine_batch
from selfevolve.turns import Critique, Instruction, Reflexion, StopWhenCorrect
from selfevolve.types import SamplingParams, TurnPolicy
from selfevolve.verifiers import NumericVerifier

S = SamplingParams(temperature=0.0, max_new_tokens=24)


class Recording:
    """The tiny policy, keeping every conversation it was asked to continue."""

    def __init__(self, policy):
        self.policy, self.seen = policy, []

    @property
    def active_adapter(self):
        return self.policy.active_adapter

    def generate(self, convs, sampling):
        self.seen.append(convs)
        return self.policy.generate(convs, sampling)


class Hint:
    """A user's own turn policy: a fixed hint after the first attempt, then stop."""

    window = None

    def respond(self, traces):
        return ["Add the numbers one at a time." if len(t.turns) == 1 else None for t in traces]


def test_the_default_and_instruction_show_scores_instruction(tiny):
    rec = Recording(tiny)
    tasks = arith.tasks("test", n=3)
    refine_batch(tasks, rec, max_turns=2, sampling=S)
    refine_batch(tasks, rec, None, Instruction("Try again."), max_turns=2, sampling=S)
    assert [c[-1]["content"] for c in rec.seen[1]] == [SCORE_INSTRUCTION] * 3
    assert [c[-1]["content"] for c in rec.seen[3]] == ["Try again."] * 3
    assert [c[-2]["role"] for c in rec.seen[3]] == ["assistant"] * 3


def test_critique_sends_the_critics_words_and_stops_on_correct(tiny):
    rec, v = Recording(tiny), NumericVerifier()
    traces = refine_batch(arith.tasks("test", n=12), rec, v, Critique(VerifierCritic(v)), max_turns=3, sampling=S)
    sent = iter(m for turn in rec.seen[1:] for m in (c[-1]["content"] for c in turn))
    for t in traces:  # every attempt but the last was critiqued "wrong": "correct" ends the episode
        assert all(turn.critique.verdict == "wrong" for turn in t.turns[:-1])
        assert len(t.turns) == 3 or t.turns[-1].critique.verdict == "correct"
    # the messages are the critiques, in the loop's order
    expected = [REVISE_WITH_CRITIQUE.format(critique=t.turns[k].critique.text)
                for k in range(2) for t in traces if len(t.turns) > k + 1]
    assert list(sent) == expected


def test_reflexion_shows_only_the_window(tiny):
    rec, v = Recording(tiny), NumericVerifier()
    refine_batch(arith.tasks("test", n=4), rec, v, Reflexion(VerifierCritic(v, memory=3), window=1), max_turns=3,
                 sampling=S)
    for turn in rec.seen[1:]:
        for conv in turn:  # the task, one attempt, the critique (with notes on older attempts)
            assert [m["role"] for m in conv] == ["user", "assistant", "user"]
    third = [c[-1]["content"] for c in rec.seen[2]] if len(rec.seen) > 2 else []
    assert all("Notes on earlier attempts" in m for m in third)


def test_stop_when_correct_ends_right_answers_before_the_critic_sees_them(tiny):
    v = NumericVerifier()
    traces = refine_batch(arith.tasks("test", n=16), tiny, v, StopWhenCorrect(Critique(VerifierCritic(v))),
                          max_turns=2, sampling=S)
    right = [t for t in traces if t.turns[0].score == 1.0]
    assert right and all(len(t.turns) == 1 and t.turns[0].critique is None for t in right)
    assert all(len(t.turns) == 2 and t.turns[0].critique is not None for t in traces if t.turns[0].score == 0.0)


def test_a_users_turn_policy_plugs_in(tiny):
    rec = Recording(tiny)
    assert isinstance(Hint(), TurnPolicy)
    traces = refine_batch(arith.tasks("test", n=2), rec, max_turns=4, turns=Hint(), sampling=S)
    assert all(len(t.turns) == 2 for t in traces) and len(rec.seen) == 2
    assert [c[-1]["content"] for c in rec.seen[1]] == ["Add the numbers one at a time."] * 2
