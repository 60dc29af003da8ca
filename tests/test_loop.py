from selfevolve.build import refine
from selfevolve.data import arith
from selfevolve.evaluation.evaluate import evaluate
from selfevolve.feedback.prompts import SCORE_INSTRUCTION
from selfevolve.loop import conversation, refine_batch
from selfevolve.turns import Instruction, StopWhenCorrect
from selfevolve.types import Feedback, SamplingParams, Task, Trace, Turn, Verifier
from selfevolve.verifiers import NumericVerifier, get_verifier

S = SamplingParams(max_new_tokens=48)


class LengthCritic:
    """A deterministic critic: asks for a worked solution unless the answer shows steps."""

    def critique(self, task, turns):
        if "=" in turns[-1].response:
            return Feedback(text="Looks right.", source="self", verdict="correct")
        return Feedback(text="Show each step.", source="self", verdict="wrong")


def test_refine_a_prompt_string(tiny):
    trace = refine("What is 12 + 30?", tiny, max_turns=2, sampling=S)
    assert isinstance(trace, Trace) and len(trace.turns) == 2
    assert trace.final == trace.turns[-1].response and trace.final
    assert trace.task.prompt == "What is 12 + 30?" and trace.finished >= trace.created


def test_conversation_follows_turns():
    t = Trace(task=Task(id="x", prompt="Q"), turns=[Turn(response="A1"), Turn(response="A2")])
    msgs = conversation(t, [SCORE_INSTRUCTION, "C"], system="S")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in msgs] == ["S", "Q", "A1", SCORE_INSTRUCTION, "A2", "C"]
    assert [m["content"] for m in conversation(t, ["I", "C"], window=1)] == ["Q", "A2", "C"]


def test_stop_rules(tiny):
    tasks = arith.tasks("test", n=24)
    v = NumericVerifier()
    oracle = refine_batch(tasks, tiny, verifier=v, turns=StopWhenCorrect(Instruction()), max_turns=3, sampling=S)
    for t in oracle:  # stops at the first correct turn, else runs the budget
        first_ok = next((i for i, x in enumerate(t.turns) if x.score == 1.0), None)
        assert len(t.turns) == (first_ok + 1 if first_ok is not None else 3)
    full = refine_batch(tasks, tiny, verifier=v, max_turns=3, sampling=S)
    assert all(len(t.turns) == 3 and all(x.feedback is not None for x in t.turns) for t in full)
    critic = refine_batch(tasks, tiny, turns=LengthCritic(), max_turns=3, sampling=S)
    for t in critic:
        stops = [i for i, x in enumerate(t.turns) if x.critique and x.critique.verdict == "correct"]
        assert len(t.turns) == (stops[0] + 1 if stops else 3)


def test_batched_loop_matches_one_task_at_a_time(tiny):
    tasks = arith.tasks("test", n=6)
    v = NumericVerifier()
    batched = refine_batch(tasks, tiny, verifier=v, max_turns=2, sampling=S)
    single = [refine(t, tiny, verifier=v, max_turns=2, sampling=S, stop_when_correct=False) for t in tasks]
    assert [[x.response for x in t.turns] for t in batched] == [[x.response for x in t.turns] for t in single]


def test_evaluate_reports_every_metric_with_the_protocol(tiny):
    m, traces, samples = evaluate(tiny, arith.tasks("test", n=16), NumericVerifier(), max_turns=2, round=3,
                                  recipe="eval")
    assert set(m) == {"acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "edit_ratio", "truncated", "n",
                      "maj_at_k", "pass_at_k", "vs_maj_at_k", "p_flip", "feedback", "budget", "intervals"}
    assert m["n"] == 16 and abs(m["delta"] - (m["delta_i2c"] - m["delta_c2i"])) < 1e-3
    assert all(t.round == 3 and t.recipe == "eval" for t in traces)
    assert len(samples) == 16 and all(len(s) == 2 and s[0].feedback is not None for s in samples)
    assert m["maj_at_k"] <= m["pass_at_k"] and m["feedback"] == "intrinsic" and 0 <= m["p_flip"] <= 1
    for k, (lo, hi) in m["intervals"].items():
        assert lo <= m[k] <= hi, k
    spent = m["budget"]
    assert spent["k"] == 2 and spent["refine"]["samples"] == 32 and spent["maj_at_k"]["samples"] == 32
    assert spent["refine"]["tokens"] == sum(len(x.token_ids) for t in traces for x in t.turns)


class OnlyVerify:
    """A third-party verifier as users write one: `verify` and nothing else."""

    def verify(self, task, response):
        return Feedback(score=float(task.reference in response), text="checked by OnlyVerify")


def test_a_verify_only_verifier_works_in_the_loop(tiny):
    """It used to crash refine_batch with AttributeError: 'OnlyVerify' object has no attribute 'verify_batch'."""
    tasks = arith.tasks("test", 4, seed=0)
    for verifier in (OnlyVerify(), get_verifier("tests.test_loop:OnlyVerify")):
        assert isinstance(verifier, Verifier) or not hasattr(verifier, "verify_batch")
        traces = refine_batch(tasks, tiny, verifier, LengthCritic(), max_turns=2, sampling=S)
        assert all(t.turns[0].feedback.text == "checked by OnlyVerify" for t in traces)
        metrics, _, _ = evaluate(tiny, tasks, verifier, max_turns=2, sampling=S)
        assert metrics["n"] == 4
    assert isinstance(get_verifier("tests.test_loop:OnlyVerify"), Verifier)
