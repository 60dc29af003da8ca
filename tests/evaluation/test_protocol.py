"""The evaluation protocol's parts on exact cases: intervals, McNemar, majority voting, the
oracle check, paired differences, and seeds/compare end to end."""

import json

import numpy as np
import pytest

from selfevolve.data import arith
from selfevolve.evaluation.protocol import (
    bootstrap,
    depends_on_correctness,
    feedback_kind,
    majority_correct,
    mcnemar_p,
    paired_difference,
)
from selfevolve.feedback import SelfCritic, VerifierCritic
from selfevolve.loop import refine_batch
from selfevolve.types import Feedback, SamplingParams, Task, Trace, Turn
from selfevolve.verifiers import NumericVerifier
from tests.test_cli import cli


def turn(answer, score):
    return Turn(response=f"The answer is {answer}.", feedback=Feedback(score=score, details={"answers": [answer]}))


def trace(task_id, *scores):
    return Trace(task=Task(id=task_id, prompt="p"), turns=[turn(str(i), s) for i, s in enumerate(scores)])


def test_mcnemar_matches_the_binomial_tail():
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2 ** 10, abs=1e-4)
    assert mcnemar_p(1, 4) == mcnemar_p(4, 1) == pytest.approx(2 * (1 + 5) / 32, abs=1e-4)
    assert mcnemar_p(0, 0) == 1.0


def test_bootstrap_is_seeded_and_covers_the_mean():
    x = np.array([1.0] * 30 + [0.0] * 70)
    a, b = bootstrap({"x": x}, seed=3), bootstrap({"x": x}, seed=3)
    assert a == b and a["x"][0] < 0.3 < a["x"][1]
    # a binomial proportion's 95% interval is about ±1.96·sqrt(p(1-p)/n) = ±0.09
    assert 0.15 < a["x"][1] - a["x"][0] < 0.21
    assert bootstrap({"x": x}, seed=4) != a


def test_majority_vote_groups_by_the_extracted_answer_and_breaks_ties_by_order():
    assert majority_correct([turn("3", 0), turn("4", 1), turn("4", 1)])
    assert not majority_correct([turn("3", 0), turn("3", 0), turn("4", 1)])
    assert not majority_correct([turn("3", 0), turn("4", 1)])  # a tie: the first answer
    assert majority_correct([Turn(response="?", feedback=Feedback(score=0, details={"answers": []})), turn("4", 1)])


def test_paired_difference_is_paired_by_task():
    a = [trace(f"t{i}", 0, 0) for i in range(40)]
    b = [trace(f"t{i}", 0, 1 if i < 20 else 0) for i in reversed(range(40))]  # half fixed at turn 2, other order
    d = paired_difference(a, b)
    assert d["n"] == 40 and d["difference"]["acc_t2"] == 0.5 and d["difference"]["acc_t1"] == 0
    lo, hi = d["intervals"]["acc_t2"]
    assert 0.3 < lo < 0.5 < hi < 0.7 and d["intervals"]["acc_t1"] == [0.0, 0.0]


def test_feedback_kinds():
    assert [feedback_kind(c) for c in ("none", "self", "judge", "verifier")] == ["intrinsic", "intrinsic", "external",
                                                                              "oracle"]
    assert feedback_kind("none", stop_when_correct=True) == "oracle"


def test_the_counterfactual_check_flags_a_critique_that_carries_correctness(tiny):
    tasks = arith.tasks("test", 24, seed=0)  # enough that some first attempts are wrong and get a critique
    v = NumericVerifier()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    oracle = VerifierCritic(v)
    traces = refine_batch(tasks, tiny, v, oracle, max_turns=2, sampling=greedy)
    assert depends_on_correctness(oracle, traces)
    own = SelfCritic(tiny, sampling=SamplingParams(temperature=0.0, max_new_tokens=16))
    traces = refine_batch(tasks, tiny, v, own, max_turns=2, sampling=greedy)
    assert not depends_on_correctness(own, traces)
    assert not depends_on_correctness(None, traces)


def test_seeds_then_compare_then_report(tmp_path):
    small = ["recipe=rest_em", "iterations=1", "train_tasks=16", "num_samples=2", "eval_limit=16", "val_limit=16",
             "epochs=1", "max_new_tokens=24"]
    d = tmp_path / "seeds"
    r = cli("run", *small, "seeds=0,1", f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    sj = json.loads((d / "seeds.json").read_text())
    assert sj["seeds"] == [0, 1] and all((d / f"seed-{s}" / "summary.json").exists() for s in (0, 1))
    after = [json.loads((d / f"seed-{s}" / "summary.json").read_text())["after"]["acc_t2"] for s in (0, 1)]
    assert sj["after"]["acc_t2"]["values"] == after
    assert sj["after"]["acc_t2"]["mean"] == pytest.approx(sum(after) / 2, abs=1e-4)
    assert sj["after"]["acc_t2"]["std"] == pytest.approx(abs(after[0] - after[1]) / 2 ** 0.5, abs=1e-4)
    again = cli("run", *small, "seeds=0,1", f"run_dir={d}", "resume=true")  # finished seeds are skipped
    assert again.returncode == 0 and again.stdout.count("finished already") == 2, again.stderr
    out = tmp_path / "c.json"
    r = cli("compare", str(d), str(d), f"out={out}")
    assert r.returncode == 0, r.stderr
    c = json.loads(out.read_text())
    assert c["n"] == 32 and c["difference"]["acc_t2"] == 0 and c["intervals"]["acc_t2"] == [0.0, 0.0]
    bad = cli("compare", str(d / "seed-0"), str(d / "seed-1"))  # different seeds draw different tasks
    assert bad.returncode == 2 and "share no task ids" in bad.stderr
    assert cli("run", *small, "seeds=0,x", f"run_dir={tmp_path / 'x'}").returncode == 2
    r = cli("report", str(d), f"out={tmp_path / 'rep'}")
    assert r.returncode == 0 and "mean ± std" in (tmp_path / "rep" / "report.html").read_text()
