"""TraceStore: durable traces in SQLite (docs/architecture.md, "Core types").

WAL mode with synchronous=FULL: an `append` is one transaction, so a process killed
mid-write leaves a readable store that lost at most the batch it was writing; readers
never block the writer. The full Trace is stored as JSON next to indexed columns (run,
recipe, round, task, scores) used by queries. `seq` is the append order; recipes record
it in their checkpoints, and a resumed run drops what was appended after its checkpoint
(`truncate_after`), so no trace is lost or duplicated.

The schema is versioned (`meta.schema_version`); opening a store written by a newer
selfevolve fails with a clear message rather than misreading it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from selfevolve.errors import UserError, disk_full
from selfevolve.types import Feedback, Trace

SCHEMA_VERSION = 1
CHAT = "json_extract(data, '$.meta.kind') IS NOT 'completion'"  # a trace the recipes can learn from
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS traces (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    run TEXT, recipe TEXT, round INTEGER NOT NULL DEFAULT 0,
    task_id TEXT NOT NULL, policy_version TEXT,
    n_turns INTEGER NOT NULL, score_first REAL, score_last REAL,
    created REAL NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_run_round ON traces (run, round);
CREATE INDEX IF NOT EXISTS traces_task ON traces (task_id);
CREATE INDEX IF NOT EXISTS traces_score ON traces (score_last);
"""


class TraceStore:
    """Append and query traces.

    >>> import tempfile, os
    >>> from selfevolve.types import Task, Turn, Feedback
    >>> s = TraceStore(os.path.join(tempfile.mkdtemp(), "t.sqlite"))
    >>> s.append([Trace(task=Task(id="a", prompt="p"), turns=[Turn(response="r", feedback=Feedback(score=1.0))])])
    1
    >>> [t.task.id for t in s.query(min_score=1.0)]
    ['a']
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            version = self._version()
            if version is None:
                with self.db:
                    self.db.executescript(SCHEMA)
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif version > SCHEMA_VERSION:
                raise UserError(
                    f"{self.path}: trace store schema v{version} is newer than this selfevolve (v{SCHEMA_VERSION})"
                )
        except sqlite3.DatabaseError as e:
            if disk_full(e):
                raise  # a write failed (disk full): the CLI reports that, not a corrupt store
            raise UserError(f"{self.path}: not a readable trace store ({e})") from None
        self.lock = threading.Lock()

    def _version(self) -> int | None:
        has_meta = self.db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            return None
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        self.db.close()

    # --- writing -----------------------------------------------------------------------

    def append(self, traces: list[Trace]) -> int:
        """Append a batch in one transaction (all or nothing). Returns how many."""
        rows = [(t.id, t.run, t.recipe, t.round, t.task.id, t.policy_version, len(t.turns),
                 t.turns[0].score if t.turns else None, t.turns[-1].score if t.turns else None, t.created,
                 t.model_dump_json()) for t in traces]
        with self.lock, self.db:
            self.db.executemany(
                "INSERT INTO traces (id, run, recipe, round, task_id, policy_version, n_turns,"
                " score_first, score_last, created, data) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return len(rows)

    def add_feedback(self, trace_id: str, feedback: Feedback) -> Trace | None:
        """Attach a verdict given after the fact (a user's, `source="user"`) to the stored trace
        `trace_id` (exact id): it becomes the last turn's feedback, so score filters and the
        recipes see it; what it replaces stays in `meta["replaced_feedback"]`, and every
        verdict in `meta["feedback"]`. One transaction; None (nothing changed) for an unknown
        id or a trace without turns."""
        with self.lock, self.db:
            row = self.db.execute("SELECT data FROM traces WHERE id = ?", (trace_id,)).fetchone()
            if row is None:
                return None
            trace = Trace.model_validate_json(row[0])
            if not trace.turns:
                return None
            last = trace.turns[-1]
            if last.feedback is not None and last.feedback.source != "user":
                trace.meta.setdefault("replaced_feedback", last.feedback.model_dump())
            trace.meta.setdefault("feedback", []).append({**feedback.model_dump(), "created": time.time()})
            last.feedback = feedback
            self.db.execute("UPDATE traces SET data = ?, score_last = ?, score_first = ? WHERE id = ?",
                            (trace.model_dump_json(), last.score, trace.turns[0].score, trace_id))
        return trace

    def last_seq(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM traces").fetchone()[0]

    def truncate_after(self, seq: int) -> int:
        """Delete traces appended after `seq` (a resumed run redoes that work)."""
        with self.lock, self.db:
            return self.db.execute("DELETE FROM traces WHERE seq > ?", (seq,)).rowcount

    # --- reading -----------------------------------------------------------------------

    def _where(
        self,
        run=None,
        recipe=None,
        round=None,
        task_id=None,
        min_score=None,
        max_score=None,
        meta: dict[str, Any] | None = None,
        from_seq=None,
        policy_version=None,
        scored: bool = False,
        source: str | None = None,
        referenced: bool = False,
        chat: bool = False,
    ) -> tuple[str, list]:
        clauses, args = [], []
        if chat:  # answered, and not a raw completion (`selfevolve serve` logs its kind)
            clauses.append(f"n_turns > 0 AND {CHAT}")
        if scored:
            clauses.append("score_last IS NOT NULL")
        if source is not None:  # whose verdict the last turn carries
            clauses.append("json_extract(data, '$.turns[' || (n_turns - 1) || '].feedback.source') = ?")
            args.append(source)
        if referenced:  # a task a verifier can score: a reference, or tests that are not empty
            clauses.append("(json_extract(data, '$.task.reference') IS NOT NULL"
                           " OR COALESCE(json_extract(data, '$.task.tests'), '') NOT IN ('', '[]'))")
        if from_seq is not None:
            clauses.append("seq >= ?")
            args.append(from_seq)
        for col, val in (("run", run), ("recipe", recipe), ("round", round), ("task_id", task_id)):
            if val is not None:
                clauses.append(f"{col} = ?")
                args.append(val)
        if policy_version is not None:  # a version id, or a name: any of its versions (`evolved@…`)
            clauses.append("(policy_version = ? OR substr(policy_version, 1, length(?) + 1) = ? || '@')")
            args += [policy_version] * 3
        if min_score is not None:
            clauses.append("score_last >= ?")
            args.append(min_score)
        if max_score is not None:
            clauses.append("score_last <= ?")
            args.append(max_score)
        for k, v in (meta or {}).items():
            clauses.append("json_extract(data, ?) = json_extract(?, '$')")
            args += [f"$.meta.{k}", json.dumps(v)]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def iter(self, limit: int | None = None, **filters) -> Iterator[Trace]:
        where, args = self._where(**filters)
        sql = f"SELECT data FROM traces{where} ORDER BY seq" + (f" LIMIT {int(limit)}" if limit else "")
        for (data,) in self.db.execute(sql, args):
            yield Trace.model_validate_json(data)

    def query(self, limit: int | None = None, **filters) -> list[Trace]:
        """Traces matching all filters (run, recipe, round, task_id, min_score, max_score on
        the last turn, meta={key: value}, from_seq; `scored`: the last turn has a score;
        `source`: whose verdict it is; `referenced`: the task carries a reference or tests;
        `chat`: answered, and not a raw completion), in append order."""
        return list(self.iter(limit=limit, **filters))

    def first_of_task(self, task_id: str, **filters) -> tuple[int, Trace] | None:
        """(append position, trace) of the first trace of `task_id` that `filters` select: an
        indexed lookup, its cost that of the task's traces, not of the store."""
        where, args = self._where(task_id=task_id, **filters)
        row = self.db.execute(f"SELECT seq, data FROM traces{where} ORDER BY seq LIMIT 1", args).fetchone()
        return (row[0], Trace.model_validate_json(row[1])) if row else None

    def by_ids(self, ids: list[str], **filters) -> Iterator[tuple[int, Trace]]:
        """(append position, trace) of the traces with these exact ids that `filters` select,
        in append order (unknown ids skipped): indexed lookups."""
        rows = []
        for k in range(0, len(ids), 500):
            part = ids[k:k + 500]
            where, args = self._where(**filters)
            where = (where + " AND" if where else " WHERE") + f" id IN ({','.join('?' * len(part))})"
            rows += self.db.execute(f"SELECT seq, data FROM traces{where}", args + part).fetchall()
        for seq, data in sorted(rows):
            yield seq, Trace.model_validate_json(data)

    def task_ids_newest(self, from_seq: int | None = None) -> Iterator[str]:
        """Task ids, each once, in the order of their newest trace (from `from_seq` on), newest
        first: read lazily, so the first k cost the traces above them, not the store."""
        seen: set[str] = set()
        for (task_id,) in self.db.execute("SELECT task_id FROM traces WHERE seq >= ? ORDER BY seq DESC",
                                          (from_seq or 0,)):
            if task_id not in seen:
                seen.add(task_id)
                yield task_id

    def first_seq(self, policy_version: str) -> int | None:
        """The append position of the first trace `policy_version` answered (None: none): a
        version id as the server logs it (`evolved@3f2a…`), or a name, which matches any of its
        versions (`evolved`: from the first promoted one)."""
        where, args = self._where(policy_version=policy_version)
        return self.db.execute(f"SELECT MIN(seq) FROM traces{where}", args).fetchone()[0]

    def count(self, **filters) -> int:
        where, args = self._where(**filters)
        return self.db.execute(f"SELECT COUNT(*) FROM traces{where}", args).fetchone()[0]

    def ids(self, **filters) -> list[str]:
        """The ids of the traces `filters` select, in append order."""
        where, args = self._where(**filters)
        return [r[0] for r in self.db.execute(f"SELECT id FROM traces{where} ORDER BY seq", args)]

    def count_scored(self, after: int = 0) -> int:
        """How many traces the recipes can learn from (not raw completions) appended after
        position `after` have a score: a range scan of the newest rows, its cost that of the
        rows counted, not of the store."""
        return self.db.execute(f"SELECT COUNT(*) FROM traces WHERE seq > ? AND score_last IS NOT NULL AND {CHAT}",
                               (after,)).fetchone()[0]

    def newest_scored(self, upto: int | None = None) -> Iterator[tuple[str, int]]:
        """(id, append position) of the traces with a score that the recipes can learn from,
        newest first, from position `upto` down: read lazily, so taking the newest k costs k
        rows (and the others between), not the store."""
        upto = self.last_seq() if upto is None else upto
        yield from self.db.execute(f"SELECT id, seq FROM traces WHERE seq <= ? AND score_last IS NOT NULL AND {CHAT} "
                                   "ORDER BY seq DESC", (upto,))

    def get(self, trace_id: str) -> Trace | None:
        row = self.db.execute("SELECT data FROM traces WHERE id = ? OR id LIKE ?", (trace_id,
                                                                                    trace_id + "%")).fetchone()
        return Trace.model_validate_json(row[0]) if row else None

    # --- export / import ---------------------------------------------------------------

    def to_jsonl(self, path: str | Path, **filters) -> int:
        """One full Trace JSON per line (round-trips through `import_jsonl`)."""
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            for t in self.iter(**filters):
                f.write(t.model_dump_json() + "\n")
                n += 1
        return n

    def import_jsonl(self, path: str | Path, batch: int = 500) -> int:
        buf, n = [], 0
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    buf.append(Trace.model_validate_json(line))
                except ValueError as e:
                    raise UserError(f"{path}:line {i}: not a trace ({str(e).splitlines()[0]})") from None
                if len(buf) >= batch:
                    n += self.append(buf)
                    buf = []
        return n + (self.append(buf) if buf else 0)

    def to_dataset(self, **filters):
        """A `datasets.Dataset` with one flat row per trace (see `flat_row`)."""
        from datasets import Dataset

        rows = [flat_row(t) for t in self.iter(**filters)]
        if not rows:
            raise UserError(f"{self.path}: no traces match {filters or 'the query'}")
        return Dataset.from_list(rows)

    def to_parquet(self, path: str | Path, **filters) -> int:
        ds = self.to_dataset(**filters)
        ds.to_parquet(str(path))
        return len(ds)


def flat_row(t: Trace) -> dict[str, Any]:
    """Columns for tabular export: ids, prompt, reference, per-turn responses/scores/
    critiques as lists, and the full trace as JSON (so nothing is lost)."""
    return {"id": t.id, "run": t.run, "recipe": t.recipe, "round": t.round, "task_id": t.task.id,
            "prompt": t.task.prompt, "reference": t.task.reference, "policy_version": t.policy_version,
            "n_turns": len(t.turns), "responses": [x.response for x in t.turns], "scores": [x.score for x in t.turns],
            "critiques": [x.critique.text if x.critique else None for x in t.turns], "meta": json.dumps(t.meta),
            "trace": t.model_dump_json()}
