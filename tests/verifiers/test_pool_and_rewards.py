import time

import pytest

from selfevolve.errors import UserError
from selfevolve.types import Task
from selfevolve.verifiers import (
    ChoiceVerifier,
    ExactVerifier,
    MathVerifier,
    NumericVerifier,
    RegexVerifier,
    RewardFunctionVerifier,
    VerifierPool,
    get_verifier,
    reward_function,
)
from tests.verifiers.helpers import Misbehaving, length_reward


def tasks(n):
    return [Task(id=f"t{i}", prompt=f"p{i}", reference=str(i)) for i in range(n)]


def test_pool_preserves_order_and_survives_timeouts_crashes_and_errors():
    ts = tasks(8)
    responses = ["0", "sleep", "2", "crash", "4", "raise", "nope", "7"]
    with VerifierPool(Misbehaving(), workers=2, timeout=1.5) as pool:
        t0 = time.monotonic()
        fbs = pool.map(ts, responses)
        assert time.monotonic() - t0 < 20
        assert [f.score for f in fbs] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
        assert "timed out" in fbs[1].text and fbs[1].details["error"] == "timeout"
        assert "crashed" in fbs[3].text and fbs[3].details["exitcode"] == 3
        assert "ValueError: bad input" in fbs[5].text
        again = pool.map(ts[:3], ["0", "1", "x"])  # the replaced workers keep serving
        assert [f.score for f in again] == [1.0, 1.0, 0.0]


def test_a_worker_killed_between_batches_is_replaced_without_blaming_an_item():
    answers = [f"The answer is {i}." for i in (0, 1, 2, 9)]
    with VerifierPool(NumericVerifier(), workers=2) as pool:
        assert [f.score for f in pool.map(tasks(4), answers)] == [1.0, 1.0, 1.0, 0.0]
        for w in pool.procs:
            w.proc.kill()
            w.proc.join()
        fbs = pool.map(tasks(4), answers)
        assert [f.score for f in fbs] == [1.0, 1.0, 1.0, 0.0] and not any("crashed" in f.text for f in fbs)
        assert all(w.proc.is_alive() for w in pool.procs)


def test_pool_runs_math_in_worker_processes():
    ts = [Task(id=str(i), prompt="q", reference=str(i)) for i in range(40)]
    rs = [f"\\boxed{{{i if i % 3 else i + 1}}}" for i in range(40)]
    with VerifierPool(MathVerifier(), workers=2) as pool:
        fbs = pool.map(ts, rs)
    assert [f.score for f in fbs] == [MathVerifier().verify(t, r).score for t, r in zip(ts, rs)]


def test_reward_function_as_verifier_and_back():
    v = RewardFunctionVerifier(length_reward)
    assert v.verify(Task(id="a", prompt="p"), "abc").score == pytest.approx(0.25)
    f = reward_function(NumericVerifier())
    # TRL passes dataset columns as keyword lists, and chat completions as message lists
    assert f(["q1", "q2"], ["The answer is 4.", [{"role": "assistant", "content": "The answer is 5."}]],
             answer=["4", "4"], extra=[1, 2]) == [1.0, 0.0]


def test_short_names_and_dotted_paths():
    assert isinstance(get_verifier("math"), MathVerifier)
    assert isinstance(get_verifier("tests.verifiers.helpers:Misbehaving"), Misbehaving)
    fn = get_verifier("tests.verifiers.helpers.length_reward")
    assert isinstance(fn, RewardFunctionVerifier) and fn.name == "length_reward"
    with pytest.raises(UserError, match="unknown verifier"):
        get_verifier("mathh")
    with pytest.raises(UserError, match="cannot import"):
        get_verifier("no.such.module:thing")


def test_text_verifiers():
    t = Task(id="t", prompt="Capital of France?", reference="Paris")
    assert ExactVerifier().verify(t, "The answer is: Paris!").score == 1.0
    assert ExactVerifier().verify(t, "Lyon").score == 0.0
    r = Task(id="r", prompt="date", reference=r"^\d{4}-\d{2}-\d{2}$")
    assert RegexVerifier().verify(r, "2024-02-30").score == 1.0 and RegexVerifier().verify(r, "Feb 30").score == 0.0
    c = Task(id="c", prompt="pick", reference="(C)")
    assert ChoiceVerifier().verify(c, "The answer is C").score == 1.0
    assert ChoiceVerifier().verify(c, "The answer is A, B, C or D").score == 0.0
    assert ChoiceVerifier().verify(c, "I cannot decide").score == 0.0


def test_verify_batch_equals_verify():
    ts = tasks(5)
    rs = [f"The answer is {i % 2}." for i in range(5)]
    v = NumericVerifier()
    assert v.verify_batch(ts, rs) == [v.verify(t, r) for t, r in zip(ts, rs)]


def test_a_pool_is_a_verifier_the_loop_can_use():
    from selfevolve.loop import refine_batch
    from selfevolve.types import SamplingParams, Turn

    class Echo:
        """A policy that answers with the task's reference (to test the plumbing)."""
        active_adapter = None

        def generate(self, conversations, sampling):
            return [[Turn(response=f"The answer is {c[0]['content'][1:]}.")] for c in conversations]

    ts = [Task(id=str(i), prompt=f"p{i}", reference=str(i if i % 2 else -1)) for i in range(6)]
    pool = get_verifier("numeric", workers=2)
    assert isinstance(pool, VerifierPool)
    with pool:
        traces = refine_batch(ts, Echo(), verifier=pool, max_turns=1, sampling=SamplingParams())
    assert [t.turns[0].score for t in traces] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
