"""Critics on the tiny model and on real verifier results; the loop's use of them."""

import pytest

from selfevolve.build import refine
from selfevolve.errors import UserError
from selfevolve.feedback import JudgeCritic, SelfCritic, VerifierCritic, get_critic
from selfevolve.loop import conversation, refine_batch
from selfevolve.types import Feedback, SamplingParams, Task, Trace, Turn
from selfevolve.verifiers import get_verifier

TASK = Task(id="t", prompt="What is 7 + 8 - 3 + 4?", reference="16")
GREEDY = SamplingParams(max_new_tokens=40)


def test_verifier_critic_says_what_is_wrong_without_the_answer():
    critic = VerifierCritic(get_verifier("numeric"))
    fb = critic.critique(TASK, [Turn(response="The answer is 15.")])
    assert fb.source == "verifier" and fb.verdict == "wrong"
    assert "15" in fb.text and "16" not in fb.text
    shown = VerifierCritic(get_verifier("numeric"), reveal_reference=True).critique(
        TASK, [Turn(response="The answer is 15.")]
    )
    assert "expected answer is 16" in shown.text
    ok = critic.critique(TASK, [Turn(response="The answer is 16.")])
    assert ok.verdict == "correct"


def test_verifier_critic_hides_a_reference_the_verifier_quotes():
    task = Task(id="r", prompt="Name a prime.", reference=r"\b(2|3|5|7)\b")
    fb = VerifierCritic(get_verifier("regex")).critique(task, [Turn(response="nine")])
    assert task.reference not in fb.text and "[hidden]" in fb.text


def test_verifier_critic_names_the_failing_test_and_the_traceback_tail():
    task = Task(id="c", prompt="Write add(a, b).", tests=["assert add(1, 2) == 3", "assert add(2, 2) == 4"],
                entry_point="add")
    fb = VerifierCritic(get_verifier("code")).critique(task, [Turn(response="def add(a, b):\n    return a - b\n")])
    assert fb.verdict == "wrong"
    assert "The failing test: assert add(1, 2) == 3" in fb.text and "AssertionError" in fb.text


def test_reflexion_memory_carries_earlier_critiques_capped():
    turns = [Turn(response=f"The answer is {i}.", critique=Feedback(text=f"critique {i}",
                                                                    source="verifier")) for i in range(5)]
    turns.append(Turn(response="The answer is 15."))
    fb = VerifierCritic(get_verifier("numeric"), memory=2).critique(TASK, turns)
    assert "critique 3" in fb.text and "critique 4" in fb.text and "critique 2" not in fb.text
    # the policy sees only the last `memory` attempts; the critique carries the notes
    shown = turns[:-1] + [turns[-1].model_copy(update={"critique": fb})]
    msgs = conversation(Trace(task=TASK, turns=shown), [f"revise {i}" for i in range(6)], window=2)
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == ["The answer is 4.", "The answer is 15."]


def test_self_critic_on_tiny_writes_a_critique_and_a_verdict(tiny):
    critic = SelfCritic(tiny, sampling=GREEDY)
    fbs = critic.critique_batch([TASK, TASK], [[Turn(response="The answer is 15.")],
                                               [Turn(response="The answer is 16.")]])
    assert all(fb.source == "self" and fb.text and fb.verdict in ("correct", "wrong") for fb in fbs)
    assert critic.prompt(TASK, [Turn(response="The answer is 15.")]).count("What is 7 + 8 - 3 + 4?") == 1


def test_templates_are_overridable_and_checked(tiny):
    custom = SelfCritic(tiny, template="Q: {question}\nA: {answer}\nIs it right?")
    assert custom.prompt(TASK, [Turn(response="x")]) == "Q: What is 7 + 8 - 3 + 4?\nA: x\nIs it right?"
    with pytest.raises(ValueError, match="answer"):
        SelfCritic(tiny, template="Q: {question}")


def test_judge_critic_uses_another_policy(tiny):
    from selfevolve.policies import HFPolicy

    judge = HFPolicy("tiny", device="cpu")
    fb = JudgeCritic(judge, sampling=GREEDY).critique(TASK, [Turn(response="The answer is 15.")])
    assert fb.source == "judge" and fb.text


def test_the_loop_stops_when_the_critic_sees_nothing_to_fix(tiny):
    critic = VerifierCritic(get_verifier("numeric"))
    tasks = [Task(id=f"{a}", prompt=f"What is {a} + 1?", reference=str(a + 1)) for a in range(1, 9)]
    traces = refine_batch(tasks, tiny, None, critic, max_turns=3, sampling=GREEDY)
    for t in traces:
        verdicts = [x.critique.verdict for x in t.turns if x.critique]
        assert "correct" not in verdicts[:-1]  # it stopped at the first "correct"
        if verdicts and verdicts[-1] == "correct":
            assert len(t.turns) < 3 or t.turns[-1].critique is None


def test_refine_api_by_name_single_and_batched():
    trace = refine("What is 7 + 8 - 3 + 4?", policy="tiny", max_turns=2, sampling=GREEDY)
    assert trace.final == trace.turns[-1].response and len(trace.turns) == 2
    many = refine([TASK, TASK.model_copy(update={"id": "u"})], policy="tiny", verifier="numeric", critic="verifier",
                  max_turns=2, sampling=GREEDY, stop_when_correct=False)
    assert len(many) == 2 and all(t.turns[0].feedback is not None for t in many)


def test_get_critic_errors_are_one_line():
    with pytest.raises(UserError, match="verifier="):
        get_critic("verifier")
    with pytest.raises(UserError, match="judge="):
        get_critic("judge")
    with pytest.raises(UserError, match="choose one of"):
        get_critic("oracle")
