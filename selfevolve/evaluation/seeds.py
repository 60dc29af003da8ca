"""`selfevolve run recipe=NAME seeds=0,1,2`: one run per seed, then their mean and spread.

    RUN_DIR/seed-0/ ...        an ordinary run directory per seed (resumable on its own)
    RUN_DIR/seeds.json         {"recipe", "seeds", "runs", "before"/"after": {metric: {mean, std, values}}}

A single run's interval covers task sampling only; seeds add what the recipe's own
randomness (rollouts, data order, initialisation) does to the result. `std` is the sample
standard deviation over seeds (n − 1). `resume=true` skips the seeds that finished and
resumes the one that was interrupted.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from selfevolve.errors import UserError
from selfevolve.evaluation.metrics import KEYS
from selfevolve.files import atomic_write

SPREAD_KEYS = KEYS[:-2] + ("maj_at_k", "pass_at_k")  # every rate (not `truncated`, not `n`)


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` -> [0, 1, 2], refusing anything else in one line.

    >>> parse_seeds("0, 1,2")
    [0, 1, 2]
    """
    try:
        seeds = [int(s) for s in str(text).strip("[]").split(",")]
    except ValueError:
        raise UserError(f"bad value for seeds={text!r}: expected comma-separated integers, e.g. seeds=0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"bad value for seeds={text!r}: a seed is repeated")
    return seeds


def run_seeds(recipe: str, seeds: list[int], overrides: dict, run_one: Callable[[dict], int]) -> int:
    """Run the recipe once per seed into RUN_DIR/seed-S (via `run_one(overrides)`, which
    returns an exit code), then write RUN_DIR/seeds.json and print mean ± std."""
    base = Path(str(overrides.get("run_dir") or f"runs/{recipe}-seeds-{time.strftime('%Y%m%d-%H%M%S')}"))
    resume = str(overrides.get("resume", "false")).lower() in ("true", "1", "yes")
    if "seed" in overrides:
        raise UserError("give seed= or seeds=, not both")
    if not resume and base.exists() and any(base.iterdir()):
        raise UserError(f"run_dir={base} exists and is not empty; choose another run_dir or pass resume=true")
    for seed in seeds:
        sub = base / f"seed-{seed}"
        if resume and (sub / "summary.json").exists():
            print(f"seed {seed}: finished already ({sub})")
            continue
        print(f"seed {seed}: {sub}")
        code = run_one({**overrides, "seed": str(seed), "run_dir": str(sub),
                        "resume": str(resume and (sub / "config.yaml").exists()).lower()})
        if code != 0:
            return code
    summary = summarize(base, recipe, seeds)
    print_spread(summary)
    print(f"run directory: {base} (seeds.json)")
    return 0


def summarize(base: Path, recipe: str, seeds: list[int]) -> dict:
    runs = [json.loads((base / f"seed-{s}" / "summary.json").read_text()) for s in seeds]
    out = {"recipe": recipe, "seeds": seeds, "runs": [f"seed-{s}" for s in seeds]}
    for which in ("before", "after"):
        blocks = [r[which] for r in runs if r.get(which)]
        if len(blocks) != len(runs):
            continue
        out[which] = {k: {"mean": round(statistics.fmean(b[k] for b in blocks), 4),
                          "std": round(statistics.stdev(b[k] for b in blocks), 4) if len(blocks) > 1 else 0.0,
                          "values": [b[k] for b in blocks]}
                      for k in SPREAD_KEYS if all(k in b for b in blocks)}
    atomic_write(base / "seeds.json", json.dumps(out, indent=2) + "\n")
    return out


def print_spread(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['recipe']}: mean ± std over seeds {summary['seeds']} (test split)")
    table.add_column("metric")
    cols = [w for w in ("before", "after") if w in summary]
    for w in cols:
        table.add_column(w, justify="right")
    for k in summary["after"]:
        table.add_row(k, *(f"{summary[w][k]['mean']:.3f} ± {summary[w][k]['std']:.3f}" if k in summary[w] else "—"
                           for w in cols))
    Console().print(table)
