"""Shared check for recipes that pick one of several models (ReST-EM, STaR): the choice is
made on the validation split and the test split is evaluated only before training and once
for the chosen model. Old code picked the best iteration on the test tasks: this fails there."""

import json
from pathlib import Path

from selfevolve.data.store import TraceStore


def check_selected_on_validation(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["protocol"]["selected_on"] == "validation" and summary["protocol"]["reported_on"] == "test"
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["eval"] for e in evals if e["split"] == "test"] == ["before", "after"]
    during = [e for e in evals if e["eval"].startswith("iteration-")]
    assert during and all(e["split"] == "validation" for e in during)
    best = max(during, key=lambda e: e["acc_t1"])
    assert summary["best_iteration"] == best["round"]
    after = evals[-1]
    assert all(summary["after"][k] == after[k] for k in ("acc_t1", "acc_t2", "n", "maj_at_k", "intervals"))
    store = TraceStore(run_dir / "traces.sqlite")
    served = {t.policy_version for t in store.query(meta={"eval": "after"})}
    assert served == {f"iter-{best['round']}" + ("" if best is during[-1] else "-selected")}, served
    test_ids = {t.task.id for t in store.query(meta={"eval": "after"})}
    val_ids = {t.task.id for t in store.query(meta={"eval": during[0]["eval"]})}
    assert test_ids and val_ids and not test_ids & val_ids
    return summary
