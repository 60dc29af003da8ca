"""`selfevolve traces` on a real run directory: list, filter, show, export (Parquet loads
with datasets), and bad input."""

import json

import pytest

from tests.test_cli import cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tr") / "run"
    r = cli("run", "recipe=rest_em", "iterations=1", "train_tasks=16", "num_samples=2", "eval_limit=30", "val_limit=30",
            "epochs=1", "max_new_tokens=24", f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    return d


def test_list_filter_show_export(run_dir, tmp_path):
    from datasets import load_dataset

    from selfevolve.data.store import TraceStore

    r = cli("traces", str(run_dir), "eval=before", "limit=5")
    assert r.returncode == 0 and "30 traces" in r.stdout
    store = TraceStore(run_dir / "traces.sqlite")
    before = store.query(meta={"eval": "before"})
    c2i = [t for t in before if t.correct_at(1) and not t.correct_at(2)]
    out = tmp_path / "c2i.jsonl"
    r = cli("traces", str(run_dir), "eval=before", "flip=c2i", f"export={out}")
    if not c2i:
        assert r.returncode == 2 and "no traces match" in r.stderr
    else:
        assert r.returncode == 0 and [json.loads(x)["id"] for x in out.read_text().splitlines()] == [t.id for t in c2i]
    pq = tmp_path / "all.parquet"
    r = cli("traces", f"run_dir={run_dir}", "eval=before", f"export={pq}", "format=parquet")
    assert r.returncode == 0, r.stderr
    ds = load_dataset("parquet", data_files=str(pq), split="train")
    assert len(ds) == 30 and set(ds["id"]) == {t.id for t in before}
    r = cli("traces", str(run_dir), f"show={before[0].id[:12]}")
    assert r.returncode == 0 and "--- turn 2 ---" in r.stdout and before[0].task.prompt in r.stdout


@pytest.mark.parametrize("args,words", [(["/nonexistent"], "no traces.sqlite"), (["flip=sideways"], "flip"),
                                        (["colour=red"], "colour")])
def test_bad_input(run_dir, args, words):
    full = args if args[0].startswith("/") else [str(run_dir), *args]
    r = cli("traces", *full)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
