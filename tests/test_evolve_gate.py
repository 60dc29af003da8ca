"""The evolve gate (`evolve.gate`), a pure function over two evaluations' per-task outcomes:
its test is exact, an identical candidate is promoted in at most alpha of rounds, and one
favourable task is not a promotion."""

import math
import random

import pytest

from selfevolve.evolve import gate, sign_test


def test_sign_test_is_the_binomial_tail():
    assert sign_test(5, 0) == pytest.approx(1 / 32)
    assert sign_test(0, 5) == 1.0
    assert sign_test(7, 3) == pytest.approx(sum(math.comb(10, k) for k in range(7, 11)) / 1024)
    assert sign_test(0, 0) == 1.0


def test_one_favourable_task_in_two_hundred_is_not_a_promotion():
    current = [0.0] * 200
    candidate = [1.0] + [0.0] * 199  # the review's case: 1 win, 0 losses, gain +0.5 points
    g = gate(current, candidate)
    assert (g["wins"], g["losses"], g["decision"]) == (1, 0, "rejected")
    assert g["gain_points"] == pytest.approx(0.5)


def test_a_clear_gain_is_promoted_and_the_thresholds_apply():
    current = [1.0] * 150 + [0.0] * 50
    candidate = [1.0] * 148 + [0.0] * 2 + [1.0] * 20 + [0.0] * 30  # 20 wins, 2 losses: +9 points
    g = gate(current, candidate)
    assert g["decision"] == "promoted" and g["p_value"] < 1e-4 and g["gain_points"] == pytest.approx(9.0)
    assert gate(current, candidate, min_gain=10.0)["decision"] == "rejected"
    assert gate(current, candidate, min_discordant=23)["decision"] == "rejected"
    assert gate(candidate, current)["decision"] == "rejected"  # the other way round: a loss
    with pytest.raises(ValueError):
        gate(current, candidate[:-1])


@pytest.mark.parametrize("n,differ", [(50, 0.02), (200, 0.1), (500, 0.3)])
def test_an_identical_candidate_is_promoted_in_at_most_alpha_of_rounds(n, differ):
    """Candidate and served equally good: each task they differ on is a fair coin."""
    rng = random.Random(0)
    rounds, promoted = 2000, 0
    for _ in range(rounds):
        current, candidate = [], []
        for _ in range(n):
            a = float(rng.random() < 0.7)
            if rng.random() < differ:  # they differ here: either one is right, with equal odds
                a = float(rng.random() < 0.5)
                current.append(a)
                candidate.append(1 - a)
            else:
                current.append(a)
                candidate.append(a)
        promoted += gate(current, candidate)["decision"] == "promoted"
    assert promoted / rounds <= 0.05


def _evolve(tmp_path, n: int):
    """An Evolve over a real store of `n` scored traces (no server needed until run())."""
    from selfevolve.cli import _config_path, _recipe
    from selfevolve.config import build
    from selfevolve.data import arith
    from selfevolve.data.store import TraceStore
    from selfevolve.evolve import Evolve, EvolveConfig
    from selfevolve.types import Feedback, Trace, Turn

    store = TraceStore(tmp_path / "traces.sqlite")
    store.append([Trace(task=t, turns=[Turn(response="The answer is 1.", feedback=Feedback(score=float(i % 2)))])
                  for i, t in enumerate(arith.tasks("train", n=n))])
    store.close()
    cfg = build(EvolveConfig, {"model": "http://127.0.0.1:9/v1", "traces": str(tmp_path / "traces.sqlite"),
                               "run_dir": str(tmp_path / "evolve")})
    return Evolve(cfg, {"train_tasks": 30}, _recipe, _config_path)


def test_a_rejected_rounds_window_comes_back_and_a_promoted_ones_does_not(tmp_path):
    import json

    ev = _evolve(tmp_path, 50)
    every = ev.ledger.store.ids()
    assert ev.ledger.new_scored() == 50 and ev.ledger.pending(50) == every
    window = ev.ledger.pending(50, ev.recipe_cfg(0).train_limit())  # as round() fixes it: the newest train_tasks
    assert window == every[20:]
    (ev.ledger.dir / "windows").mkdir(parents=True)
    (ev.ledger.dir / "windows" / "round-0.json").write_text(json.dumps({"upto_seq": 50, "trace_ids": window}))
    ev.ledger.lineage.add_node("round-0", decision="rejected")
    ev.ledger.state["round"] = 1
    assert ev.ledger.new_scored() == 0 and ev.ledger.pending(50) == every  # nothing lost: all 50 wait
    ev.ledger.lineage.nodes["round-0"]["decision"] = "promoted"
    assert ev.ledger.pending(50) == every[:20]  # trained once; the 20 older ones cut off still wait
    assert ev.ledger.pending(50, 5) == every[15:20]  # the newest of them first
