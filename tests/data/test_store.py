import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from selfevolve.data.store import TraceStore
from selfevolve.errors import UserError
from selfevolve.types import Feedback, Task, Trace, Turn


def trace(i, score, rnd=0, **meta):
    return Trace(
        task=Task(id=f"t{i}", prompt=f"p{i}", reference="1"),
        round=rnd,
        run="r",
        recipe="test",
        turns=[Turn(response="a", feedback=Feedback(score=0.0)), Turn(response="b", feedback=Feedback(score=score))],
        meta=meta,
    )


@pytest.fixture
def store(tmp_path):
    s = TraceStore(tmp_path / "traces.sqlite")
    s.append([trace(i, float(i % 2), rnd=i // 5, kept=i % 2 == 1) for i in range(10)])
    return s


def test_wal_and_schema_version(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"


def test_queries(store):
    assert store.count() == 10
    assert store.count(round=1) == 5
    assert [t.task.id for t in store.query(task_id="t3")] == ["t3"]
    assert {t.task.id for t in store.query(min_score=1.0)} == {"t1", "t3", "t5", "t7", "t9"}
    assert store.count(max_score=0.0, round=0) == 3
    assert store.count(meta={"kept": True}) == 5
    assert len(store.query(limit=2)) == 2
    assert store.get(store.query(limit=1)[0].id).task.id == "t0"


def test_indexed_reads_for_a_rounds_setup(store):
    """What a round's setup reads by index: a task's first selected trace, traces by exact
    id, task ids newest first (each once), and the scored traces evolve counts, raw
    completions left out."""
    store.append([trace(3, 1.0, kind="completion"), trace(11, 1.0, kind="completion")])
    ids = store.ids()
    seq, first = store.first_of_task("t3")
    assert first.id == ids[3] and seq == 4 and store.first_of_task("t3", scored=True, from_seq=5)[1].id == ids[10]
    assert store.first_of_task("t11", chat=True) is None and store.first_of_task("t4", source="user") is None
    assert [t.id for _, t in store.by_ids([ids[7], "nope", ids[1]])] == [ids[1], ids[7]]
    assert [t.id for _, t in store.by_ids(ids, chat=True)] == ids[:10]
    assert list(store.task_ids_newest()) == ["t11", "t3", "t9", "t8", "t7", "t6", "t5", "t4", "t2", "t1", "t0"]
    assert list(store.task_ids_newest(from_seq=9))[:2] == ["t11", "t3"]
    assert store.count_scored() == 10 and [i for i, _ in store.newest_scored()] == ids[9::-1]


def test_append_is_atomic(store):
    dup = store.query(limit=1)[0]
    with pytest.raises(sqlite3.IntegrityError):
        store.append([trace(99, 1.0), dup])  # second row violates the unique id
    assert store.count() == 10  # the whole batch rolled back


def test_truncate_after(store):
    seq = store.last_seq()
    store.append([trace(20, 1.0)])
    assert store.truncate_after(seq) == 1 and store.count() == 10


def test_jsonl_round_trip(store, tmp_path):
    assert store.to_jsonl(tmp_path / "x.jsonl") == 10
    other = TraceStore(tmp_path / "other.sqlite")
    assert other.import_jsonl(tmp_path / "x.jsonl") == 10
    assert [t.model_dump() for t in other.query()] == [t.model_dump() for t in store.query()]


def test_import_names_the_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(trace(1, 1.0).model_dump_json() + '\n{"nope": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:line 2"):
        TraceStore(tmp_path / "s.sqlite").import_jsonl(p)


def test_parquet_loads_with_datasets(store, tmp_path):
    from datasets import load_dataset

    assert store.to_parquet(tmp_path / "x.parquet", min_score=1.0) == 5
    ds = load_dataset("parquet", data_files=str(tmp_path / "x.parquet"), split="train")
    assert len(ds) == 5 and ds[0]["responses"] == ["a", "b"] and ds[0]["scores"] == [0.0, 1.0]
    assert Trace.model_validate_json(ds[0]["trace"]).task.id == "t1"
    assert store.to_dataset(round=0).num_rows == 5


def test_newer_schema_is_refused(store, tmp_path):
    store.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    store.db.commit()
    with pytest.raises(UserError, match="newer"):
        TraceStore(store.path)


def test_not_a_store(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a readable trace store"):
        TraceStore(p)


WRITER = """
import sys
from selfevolve.data.store import TraceStore
from selfevolve.types import Task, Trace, Turn
s = TraceStore(sys.argv[1])
i = 0
while True:
    s.append([Trace(task=Task(id=f"t{i}-{k}", prompt="p" * 500), turns=[Turn(response="r" * 500)]) for k in range(50)])
    i += 1
    print(i, flush=True)
"""


def test_killed_writer_leaves_a_readable_store(tmp_path):
    path = tmp_path / "killed.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # let it commit a few batches, then kill it mid-stream
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = TraceStore(path)
    n = s.count()
    assert n >= 250 and n % 50 == 0  # whole batches only
    assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(s.query()) == n
