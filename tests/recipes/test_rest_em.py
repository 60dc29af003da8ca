"""ReST-EM: the E-step filter on real samples, and the recipe end to end through the CLI."""

import json

from selfevolve.data import arith
from selfevolve.data.store import TraceStore
from tests.recipes.pins import assert_pinned
from tests.recipes.resume import check_kill_and_resume
from tests.recipes.selection import check_selected_on_validation
from tests.test_cli import cli

SMALL = ["recipe=rest_em", "iterations=2", "train_tasks=24", "num_samples=3", "eval_limit=12", "val_limit=12",
         "epochs=1", "max_new_tokens=32", "sft_batch_size=8"]


def test_e_step_keeps_only_verified_distinct_answers_up_to_the_cap(tiny, tmp_path):
    from selfevolve.config import build
    from selfevolve.recipes.rest_em import RestEMConfig, e_step
    from selfevolve.run import Run
    from selfevolve.verifiers import NumericVerifier

    cfg = build(RestEMConfig, {"recipe": "rest_em", "num_samples": 6, "max_per_task": 2,
                               "run_dir": str(tmp_path / "r")})
    run = Run(cfg)
    tasks = arith.tasks("train", n=20)
    kept = e_step(tiny, tasks, NumericVerifier(), cfg, 0, run)
    stored = run.store.query(meta={"phase": "e_step"})
    assert len(stored) == 20 * 6
    assert all(t.turns[0].score == 1.0 for t in kept)
    per_task = {}
    for t in kept:
        per_task.setdefault(t.task.id, []).append(t.turns[0].response)
    assert all(len(v) <= 2 and len(set(v)) == len(v) for v in per_task.values())
    assert run.store.count(meta={"kept": True}) == len(kept)
    rejected = run.store.query(meta={"kept": False})
    # every rejected sample was wrong, a duplicate, or over the cap
    for t in rejected:
        ok = t.turns[0].score == 1.0
        assert not ok or t.turns[0].response in per_task.get(t.task.id, []) or len(per_task.get(t.task.id, [])) == 2


def test_run_directory_adapters_and_summary(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((d / "summary.json").read_text())
    assert summary["best_iteration"] in (0, 1) and [h["iteration"] for h in summary["iterations"]] == [0, 1]
    check_selected_on_validation(d)
    assert (d / summary["best_adapter"] / "adapter_config.json").exists()
    assert_pinned(d, sft_loss=0.075814, kept=27)
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    its = [m for m in lines if "kept" in m]
    assert [m["iteration"] for m in its] == [0, 1] and all(m["kept"] + m["rejected"] == 24 * 3 for m in its)
    store = TraceStore(d / "traces.sqlite")
    assert store.count(meta={"phase": "e_step"}) == 2 * 24 * 3
    # the second E-step sampled from the first update (synced into the policy)
    assert {t.policy_version for t in store.query(round=1, meta={"phase": "e_step"})} == {"iter-0"}


def test_killed_and_resumed_run_ends_the_same(tmp_path):
    check_kill_and_resume(SMALL, tmp_path)


def test_on_a_user_file_with_renamed_fields(tmp_path):
    import yaml

    data = tmp_path / "my_tasks.jsonl"
    data.write_text("".join(json.dumps({"uid": t.id, "question": t.prompt,
                                        "gold": t.reference}) + "\n" for t in arith.tasks("train", n=60)))
    d = tmp_path / "run"
    r = cli("run", "recipe=rest_em", f"data={data}", "prompt_field=question", "answer_field=gold", "id_field=uid",
            "iterations=1", "num_samples=2", "epochs=1", "max_new_tokens=32", f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((d / "config.yaml").read_text())["eval_fraction"] == 0.2
    store = TraceStore(d / "traces.sqlite")
    trained = {t.task.id for t in store.query(meta={"phase": "e_step"})}
    held_out = {t.task.id for t in store.query(meta={"eval": "before"})}
    validation = {t.task.id for t in store.query(meta={"eval": "iteration-0"})}
    assert trained and held_out and validation and len(trained | held_out | validation) == 60
    assert not trained & held_out and not trained & validation and not validation & held_out
    assert all(i.startswith("arith-") for i in trained)  # ids came from the uid column
    assert json.loads((d / "summary.json").read_text())["after"]["n"] == len(held_out)

    other = tmp_path / "held_out.jsonl"
    other.write_text("".join(json.dumps({"question": t.prompt,
                                         "gold": t.reference}) + "\n" for t in arith.tasks("test", n=7)))
    d2 = tmp_path / "run2"
    r = cli("run", "recipe=rest_em", f"data={data}", f"eval_data={other}", "prompt_field=question",
            "answer_field=gold", "iterations=1", "num_samples=1", "epochs=1", "max_new_tokens=32", f"run_dir={d2}")
    assert r.returncode == 0, r.stderr
    assert json.loads((d2 / "summary.json").read_text())["before"]["n"] == 7
    store2 = TraceStore(d2 / "traces.sqlite")  # eval_data serves test; validation is still carved from data
    trained, validation = ({t.task.id for t in store2.query(meta=m)} for m in ({"phase": "e_step"},
                                                                            {"eval": "iteration-0"}))
    assert validation and not trained & validation and len(trained | validation) == 60
