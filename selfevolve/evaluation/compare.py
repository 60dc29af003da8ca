"""selfevolve compare RUN_A RUN_B [eval=after] [out=FILE] — does B differ from A?

The paired difference B − A of the two runs' test evaluations (`eval=after` by default;
`eval=before` compares the starting points), task by task, with a 95% paired-bootstrap
interval per metric: what a reader needs to decide whether an ablation differs. An interval
that contains 0 means the two runs are not distinguishable on these tasks.

Runs made with `seeds=` are compared seed by seed (A/seed-0 with B/seed-0, ...), every
(seed, task) pair one unit; both must have the same seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from selfevolve.data.store import TraceStore
from selfevolve.errors import UserError
from selfevolve.evaluation.protocol import paired_difference
from selfevolve.files import atomic_write
from selfevolve.types import Trace


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: list[str] = Field(..., min_length=2, max_length=2, description="two run directories: A B (positional)")
    eval: str = Field("after", description="which evaluation to compare (after | before | another eval name)")
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples")
    seed: int = Field(0, description="seeds the bootstrap")
    out: str | None = Field(None, description="write the differences as JSON to this file")
    debug: bool = Field(False, description="show tracebacks instead of one-line errors")


def _units(run_dir: Path) -> dict[str, Path]:
    """{"": run_dir} for one run; {"seed-0": ..., ...} for a `seeds=` directory."""
    if (run_dir / "seeds.json").is_file():
        return {r: run_dir / r for r in json.loads((run_dir / "seeds.json").read_text())["runs"]}
    if not (run_dir / "traces.sqlite").is_file():
        raise UserError(f"{run_dir} is not a run directory (no traces.sqlite)")
    return {"": run_dir}


def evaluation(run_dir: Path, which: str) -> list[Trace]:
    """The traces of one evaluation of a run (the refinement traces, not the baseline samples)."""
    traces = TraceStore(run_dir / "traces.sqlite").query(meta={"eval": which})
    if not traces:
        raise UserError(f"{run_dir}: no evaluation named {which!r} (unfinished run? try eval=before)")
    return traces


def compare(a: Path, b: Path, which: str = "after", resamples: int = 2000, seed: int = 0) -> dict:
    ua, ub = _units(a), _units(b)
    if set(ua) != set(ub):
        raise UserError(f"{a} and {b} are not comparable: runs {sorted(ua)} vs {sorted(ub)}")
    ta, tb = [], []
    for unit in sorted(ua):
        for out, d in ((ta, ua[unit]), (tb, ub[unit])):
            out += [t.model_copy(update={"task": t.task.model_copy(update={"id": f"{unit}/{t.task.id}"})})
                    for t in evaluation(d, which)]
    try:
        diff = paired_difference(ta, tb, resamples, seed)
    except ValueError as e:
        raise UserError(f"{a} vs {b}: {e}") from None
    return {"a": str(a), "b": str(b), "eval": which, **diff}


def main(cfg: CompareConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    result = compare(Path(cfg.runs[0]), Path(cfg.runs[1]), cfg.eval, cfg.bootstrap, cfg.seed)
    table = Table(title=f"B − A on {result['n']} paired tasks ({cfg.eval}); A = {cfg.runs[0]}, B = {cfg.runs[1]}")
    for col in ("metric", "B − A", "95% interval", "differs?"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k, v in result["difference"].items():
        lo, hi = result["intervals"][k]
        table.add_row(k, f"{v:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]", "yes" if lo > 0 or hi < 0 else "no (0 inside)")
    Console().print(table)
    if cfg.out:
        atomic_write(Path(cfg.out), json.dumps(result, indent=2) + "\n")
