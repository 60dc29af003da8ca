"""The pretrain recipe end to end through the CLI, on a model small enough for seconds."""

import json

import yaml

from selfevolve.store import TraceStore
from tests.recipes.resume import check_kill_and_resume
from tests.test_cli import cli

SMALL = ["recipe=pretrain", "steps=12", "n_layer=1", "n_embd=32", "n_head=2", "batch_size=8", "warmup=2",
         "eval_limit=4", "max_new_tokens=8", "checkpoint_every=3", "log_every=2"]


def test_run_directory(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((d / "config.yaml").read_text())["steps"] == 12
    assert (d / "config.yaml").read_text().startswith("# selfevolve run recipe=pretrain")
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) >= {"acc_t1", "acc_t2", "delta", "n"}
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "step" in m] == [2, 4, 6, 8, 10, 12]
    assert [m["eval"] for m in lines if "eval" in m] == ["before", "after"]
    store = TraceStore(d / "traces.sqlite")
    assert store.count(meta={"eval": "before"}) == store.count(meta={"eval": "after"}) == 4
    assert (d / "model" / "model.safetensors").exists() and (d / "checkpoint" / "state.pt").exists()
    # a second run into the same directory refuses instead of overwriting
    again = cli("run", *SMALL, f"run_dir={d}")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    changed = cli("run", *SMALL, "steps=13", f"run_dir={d}", "resume=true")
    assert changed.returncode == 2 and "different config: steps=13" in changed.stderr


def test_killed_and_resumed_run_ends_the_same(tmp_path):
    whole, cut = check_kill_and_resume(SMALL, tmp_path)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "time_train"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(cut / "metrics.jsonl") == strip(whole / "metrics.jsonl")
