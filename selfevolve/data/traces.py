"""`selfevolve traces RUN_DIR`: list, filter, show and export a run's traces.

    selfevolve traces runs/score-x                          the latest 20, one line each
    selfevolve traces runs/score-x round=40 flip=i2c        filters (round, task_id, min_score,
                                                            max_score, changed, flip=i2c|c2i, eval)
    selfevolve traces runs/score-x show=TRACE_ID            one trace turn by turn
    selfevolve traces runs/score-x flip=c2i export=c2i.parquet format=parquet
    selfevolve traces runs/serve version=evolved            what a served version answered
    selfevolve traces runs/serve trained_by=runs/evolve/round-1   what an evolve round trained on

RUN_DIR may also be a trace store itself (`runs/serve/traces.sqlite`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from selfevolve.data.store import TraceStore, flat_row
from selfevolve.errors import UserError
from selfevolve.types import Trace


class TracesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(..., description="the run directory (or give it as the first word)")
    round: int | None = Field(None, description="only this round (a recipe's step or iteration)")
    task_id: str | None = Field(None, description="only this task")
    min_score: float | None = Field(None, description="last turn's score at least")
    max_score: float | None = Field(None, description="last turn's score at most")
    changed: bool | None = Field(None, description="true: the response changed between turns; false: it did not")
    flip: str | None = Field(None, pattern="^(i2c|c2i)$", description="i2c: wrong then right; c2i: right then wrong")
    eval: str | None = Field(None, description="only the traces of this evaluation (e.g. before)")
    version: str | None = Field(None, description="only the traces this policy version answered (an adapter name)")
    trained_by: str | None = Field(None, description="only the traces an evolve round trained on (its directory, "
                                   "e.g. runs/evolve/round-1: the lineage's trained_on.json)")
    limit: int = Field(20, ge=1, description="traces listed (the most recent)")
    show: str | None = Field(None, description="print this trace (id or a unique prefix) turn by turn")
    export: str | None = Field(None, description="write the matching traces to this file")
    format: str = Field("jsonl", pattern="^(jsonl|parquet)$", description="export format")
    debug: bool = False


def matching(cfg: TracesConfig) -> list[Trace]:
    path = Path(cfg.run_dir)
    path = path if path.is_file() else path / "traces.sqlite"
    if not path.is_file():
        raise UserError(f"run_dir={cfg.run_dir}: no traces.sqlite there")
    meta = {"eval": cfg.eval} if cfg.eval else None
    trained = None
    if cfg.trained_by:
        where = Path(cfg.trained_by) / "trained_on.json"
        if not where.is_file():
            raise UserError(f"trained_by={cfg.trained_by}: no trained_on.json there (an evolve round's directory)")
        trained = set(json.loads(where.read_text())["trace_ids"])
    out = []
    for t in TraceStore(path).iter(round=cfg.round, task_id=cfg.task_id, min_score=cfg.min_score,
                                   max_score=cfg.max_score, meta=meta, policy_version=cfg.version):
        if trained is not None and t.id not in trained:
            continue
        changed = len({x.response for x in t.turns}) > 1
        if cfg.changed is not None and changed != cfg.changed:
            continue
        if cfg.flip == "i2c" and not (not t.correct_at(1) and t.correct_at(2)):
            continue
        if cfg.flip == "c2i" and not (t.correct_at(1) and not t.correct_at(2)):
            continue
        out.append(t)
    return out


def show(t: Trace) -> str:
    lines = [f"trace {t.id}  recipe={t.recipe} round={t.round} adapter={t.policy_version} meta={t.meta}",
             f"task {t.task.id}: {t.task.prompt}", f"reference: {t.task.reference}"]
    for i, turn in enumerate(t.turns, 1):
        lines.append(f"--- turn {i} ---\n{turn.response}")
        if turn.feedback is not None:
            lines.append(f"  [verifier] score={turn.feedback.score} {turn.feedback.text or ''}".rstrip())
        if turn.critique is not None:
            lines.append(f"  [{turn.critique.source} critique] {turn.critique.text}")
    return "\n".join(lines)


def main(cfg: TracesConfig) -> None:
    traces = matching(cfg)
    console = Console(soft_wrap=True)
    if cfg.show:
        hit = [t for t in traces if t.id.startswith(cfg.show)]
        if len(hit) != 1:
            raise UserError(f"show={cfg.show}: {len(hit)} traces match (give more of the id)")
        console.print(show(hit[0]), markup=False, highlight=False)
        return
    if cfg.export:
        if not traces:
            raise UserError("no traces match; nothing exported")
        if cfg.format == "jsonl":
            with open(cfg.export, "w", encoding="utf-8") as f:
                f.writelines(t.model_dump_json() + "\n" for t in traces)
        else:
            from datasets import Dataset  # a second to import: only for exports

            Dataset.from_list([flat_row(t) for t in traces]).to_parquet(cfg.export)
        console.print(f"{len(traces)} traces -> {cfg.export}")
        return
    table = Table(title=f"{len(traces)} traces in {cfg.run_dir} (last {min(cfg.limit, len(traces))})")
    for col in ("id", "round", "task", "scores", "changed", "final answer"):
        table.add_column(col)
    for t in traces[-cfg.limit:]:
        table.add_row(t.id[:10], str(t.round), t.task.id, " ".join(str(x.score) for x in t.turns),
                      "yes" if len({x.response for x in t.turns}) > 1 else "no", t.final[:60])
    console.print(table)
