"""SPIN end to end through the CLI: pairs stored, the opponent is the previous iterate,
per-step margins logged, resume."""

import json

from selfevolve.data.store import TraceStore
from tests.recipes.pins import assert_pinned
from tests.recipes.resume import check_kill_and_resume
from tests.test_cli import cli

SMALL = ["recipe=spin", "iterations=2", "train_tasks=24", "eval_limit=8", "val_limit=8", "epochs=1",
         "max_new_tokens=24", "pair_batch_size=8"]


def test_run_through_the_cli(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    store = TraceStore(d / "traces.sqlite")
    first, second = store.query(round=0, meta={"phase": "opponent"}), store.query(round=1, meta={"phase": "opponent"})
    assert len(first) == len(second) == 24
    assert {t.policy_version for t in first} == {None} and {t.policy_version for t in second} == {"iter-0"}
    for t in first:
        assert t.meta["gold"] == f"The answer is {t.task.reference}."
        assert t.meta["pair"] == (t.turns[0].response != t.meta["gold"])
    assert_pinned(d, loss=0.69315, reward_margin=0.0, logp_gold=-0.8058)  # log 2: the learner starts as its opponent
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "reward_margin" in m]
    assert steps and all({"loss", "reward_gold", "reward_self", "logp_gold", "logp_self"} <= set(m) for m in steps)
    its = [m for m in lines if "pairs" in m]
    # mix_previous: iteration 1 trains on its own pairs and iteration 0's
    assert its[1]["pairs"] == its[0]["new_pairs"] + its[1]["new_pairs"]
    assert (d / "adapters" / "iter-1" / "adapter_config.json").exists()


def test_killed_and_resumed_run_ends_the_same(tmp_path):
    check_kill_and_resume(SMALL, tmp_path)


def test_a_dataset_without_answers_is_refused(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(30)))
    r = cli("run", "recipe=spin", f"data={data}", f"run_dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "gold response" in r.stderr and "Traceback" not in r.stderr
