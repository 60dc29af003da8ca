import pytest

from selfevolve.evaluation.metrics import self_correction_metrics
from selfevolve.types import Feedback, Task, Trace, Turn


def tr(*pairs):
    return Trace(task=Task(id="x", prompt="p"), turns=[Turn(response=r, feedback=Feedback(score=s)) for r, s in pairs])


def test_hand_computed():
    traces = [
        tr(("The answer is 3.", 0), ("The answer is 4.", 1)),   # i2c
        tr(("The answer is 4.", 1), ("The answer is 4.", 1)),   # c2c, no edit
        tr(("The answer is 4.", 1), ("The answer is 5.", 0)),   # c2i
        tr(("The answer is 3.", 0), ("The answer is 3.", 0)),   # i2i
        tr(("The answer is 3.", 0), ("The answer is 4.", 1)),   # i2c
    ]
    m = self_correction_metrics(traces)
    assert m["n"] == 5
    assert m["acc_t1"] == 0.4 and m["acc_t2"] == 0.6
    assert m["delta"] == pytest.approx(0.2)
    assert m["delta_i2c"] == 0.4 and m["delta_c2i"] == 0.2
    # three pairs differ in one character of 16, two are identical
    assert m["edit_ratio"] == pytest.approx(round(3 * (1 / 16) / 5, 4))


def test_single_turn_and_early_stop():
    m = self_correction_metrics([tr(("a", 1)), tr(("b", 0))])
    assert m["acc_t1"] == m["acc_t2"] == 0.5 and m["delta"] == 0 and m["edit_ratio"] == 0.0


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        self_correction_metrics([])


def test_critic_rates_when_first_answers_were_critiqued():
    def critiqued(score, verdict):
        t = tr(("The answer is 4.", score))
        t.turns[0].critique = Feedback(text="...", verdict=verdict)
        return t

    m = self_correction_metrics([critiqued(0, "wrong"), critiqued(0, "correct"), critiqued(1, "wrong"),
                                 critiqued(1, "correct"), critiqued(1, "correct"), tr(("b", 0))])
    assert m["critic_tpr"] == 0.5  # of the two critiqued wrong answers, one was called wrong
    assert m["critic_fpr"] == pytest.approx(round(1 / 3, 4))  # of three right ones, one
    assert "critic_tpr" not in self_correction_metrics([tr(("a", 1)), tr(("b", 0))])  # no critic, no rates
