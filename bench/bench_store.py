"""What `selfevolve evolve` reads from the trace store as the store grows: synthetic stores of
10k, 100k and 1M traces (half of them scored), the last 500 scored ones logged since the
last round, whose 1,000-trace window was promoted (consumed). Timed, each the median of 5:

- poll: how many scored traces came since the last round (`Evolve.new_scored`, every
  `poll_s`), against listing every scored id and filtering, as evolve did before;
- window: fixing a round's window, the newest 1,000 scored traces no served version trained
  on (`Evolve.pending`), against the same full listing;
- round setup, the recipe's read: its train tasks (the window's first, then the newest
  prompts; `train_tasks=1000`) and its validation and test tasks (200 each), as
  `sources.tasks_for` loads them (indexed lookups, `sources.logged_tasks` with a limit), against
  reading every trace (the same call without a limit; 10k and 100k only).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from selfevolve.data.store import TraceStore

SIZES, NEW, WINDOW, HELD = (10_000, 100_000, 1_000_000), 500, 1_000, 200


def synthetic(path: Path, n: int) -> list[str]:
    """A store of `n` traces (every other one scored) written with one executemany per 50k."""
    store = TraceStore(path)
    rows, ids = [], []
    for i in range(n):
        tid, scored = f"t{i:07d}", i % 2 == 0
        data = json.dumps({"id": tid, "task": {"id": f"q{i % 50_000}", "prompt": f"What is {i % 97} + 1?",
                                               "reference": str(i % 97 + 1)},
                           "turns": [{"response": "The answer is 3.",
                                      "feedback": {"score": 1.0} if scored else None}],
                           "created": 0.0})
        rows.append((tid, "serve", "serve", 0, f"q{i % 50_000}", None, 1, 1.0 if scored else None,
                     1.0 if scored else None, 0.0, data))
        ids.append(tid)
        if len(rows) == 50_000 or i == n - 1:
            with store.db:
                store.db.executemany("INSERT INTO traces (id, run, recipe, round, task_id, policy_version, n_turns,"
                                     " score_first, score_last, created, data) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            rows = []
    store.close()
    return ids


def _median(fn, k: int = 5) -> float:
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run() -> dict:
    from selfevolve.cli import _config_path, _recipe
    from selfevolve.config import build
    from selfevolve.data.sources import load_tasks
    from selfevolve.evolve import Evolve, EvolveConfig

    rows, ratios = [], []
    for n in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "traces.sqlite"
            ids = synthetic(path, n)
            cfg = build(EvolveConfig, {"model": "http://127.0.0.1:9/v1", "traces": str(path), "run_dir": f"{tmp}/ev"})
            ev = Evolve(cfg, {}, _recipe, _config_path).ledger
            upto = n - 2 * NEW  # the last round's window was fixed here: 500 scored traces since
            (ev.dir / "windows").mkdir()
            window = [i for i in ids[:upto] if int(i[1:]) % 2 == 0][-WINDOW:]
            (ev.dir / "windows" / "round-0.json").write_text(json.dumps({"upto_seq": upto, "trace_ids": window}))
            ev.lineage.add_node("round-0", decision="promoted")
            ev.state["round"] = 1

            def listing():  # what evolve did before: every scored id, filtered in Python
                consumed = ev.consumed()
                return [i for i, s in ev.store.db.execute(
                    "SELECT id, seq FROM traces WHERE score_last IS NOT NULL ORDER BY seq") if i not in consumed]

            poll, window_t, old = _median(ev.new_scored), _median(lambda: ev.pending(n, WINDOW)), _median(listing)
            assert ev.new_scored() == NEW and len(ev.pending(n, WINDOW)) == WINDOW
            def setup(limited: bool):  # what a round's recipe loads: train (the window first), validation, test
                traces = {"trace_ids": set(window), "scored": True}
                return [load_tasks(str(path), split=role, holdout=(0.2, 0.1), traces=traces, unscored_train=True,
                                   limit=limit if limited else None)
                        for role, limit in (("train", WINDOW), ("validation", HELD), ("test", HELD))]

            read = _median(lambda: setup(True), 3)
            full = _median(lambda: setup(False), 1) if n <= 100_000 else None
            assert [len(r) for r in setup(True)] == [WINDOW, HELD, HELD], [len(r) for r in setup(True)]
            rows += [(f"{n:,} traces: poll", f"{poll * 1e3:.2f} ms", f"full listing {old * 1e3:.0f} ms"),
                     (f"{n:,} traces: window of {WINDOW:,}", f"{window_t * 1e3:.2f} ms",
                      f"full listing {old * 1e3:.0f} ms"),
                     (f"{n:,} traces: round setup (the recipe's tasks)", f"{read * 1e3:.0f} ms",
                      "every trace read: " + ("-" if full is None else f"{full * 1e3:.0f} ms"))]
            ratios.append((f"{n:,} traces: full listing / poll", old / poll))
            ev.store.close()
    rows_by = {r[0]: r for r in rows}
    ratios += [("poll, 1M / 10k traces", float(rows_by["1,000,000 traces: poll"][1].split()[0]) /
                float(rows_by["10,000 traces: poll"][1].split()[0])),
               ("window, 1M / 10k traces", float(rows_by[f"1,000,000 traces: window of {WINDOW:,}"][1].split()[0]) /
                float(rows_by[f"10,000 traces: window of {WINDOW:,}"][1].split()[0])),
               ("round setup, 1M / 10k traces", float(rows_by["1,000,000 traces: round setup (the recipe's tasks)"][1]
                                                       .split()[0]) /
                float(rows_by["10,000 traces: round setup (the recipe's tasks)"][1].split()[0]))]
    return {"title": "Trace store: what evolve reads as the store grows", "doc": __doc__.strip(), "rows": rows,
            "ratios": ratios}


if __name__ == "__main__":
    for row in run()["rows"]:
        print(" | ".join(row))
