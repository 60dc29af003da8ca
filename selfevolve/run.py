"""Run: the run directory and everything that makes a run resumable (docs/architecture.md, "Crash safety").

    run_dir/config.yaml      the resolved config (a resume must match it)
    run_dir/traces.sqlite    every trace of the run (TraceStore)
    run_dir/metrics.jsonl    one JSON line per logged step / evaluation
    run_dir/checkpoint/      state.pt: the recipe's state + RNG states + the lengths of
                             metrics.jsonl and the trace store at that moment
    run_dir/adapters/        LoRA adapters the recipe saved
    run_dir/summary.json     `before` and `after` evaluation blocks
    run_dir/report/          report.html + PNG plots, written at the end (selfevolve report)

Stopping: Ctrl-C (SIGINT) asks the run to stop at its next checkpoint: the recipe writes it
(SCoRe and pretraining checkpoint at the next step instead of waiting for
`checkpoint_every`), `checkpoint` raises `Stopped`, and the CLI exits 130 with the resume
command. A second Ctrl-C stops at once (the last checkpoint still holds).

Under torchrun (`nproc=N`, selfevolve/training/distributed.py) rank 0 alone writes: the other ranks
keep their trace store in memory (the recipe appends the gathered batch on every rank, so
queries agree), log nothing, checkpoint nothing, receive rank 0's evaluations and write no
summary; every rank restores from the checkpoint rank 0 wrote.

Resume for free: a recipe calls `run.restore()` once (None on a fresh start) and
`run.checkpoint(state)` at safe points. Restoring truncates metrics.jsonl and the trace
store back to what they held at the checkpoint and restores the RNGs, so the work after it
is redone exactly once and a resumed run ends with the same summary.json as an
uninterrupted one. Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from selfevolve.build import turn_policy_for, verifier_for
from selfevolve.config import RecipeConfig
from selfevolve.data.sources import tasks_for
from selfevolve.data.store import TraceStore
from selfevolve.errors import UserError, WriteFailed
from selfevolve.evaluation.evaluate import evaluate
from selfevolve.evaluation.metrics import CRITIC_KEYS, KEYS
from selfevolve.evaluation.protocol import PROTOCOL_KEYS, feedback_kind, with_interval
from selfevolve.files import atomic_write, read_metrics
from selfevolve.progress import progress
from selfevolve.trackers import Trackers, selected
from selfevolve.training import distributed
from selfevolve.training.publish import saved_update
from selfevolve.types import SamplingParams, Trace

# Keys that may change between a run and its resume without changing its result (the memory
# knobs change only fp32 rounding: resume an out-of-memory run with smaller micro-batches).
RESUME_FREE_KEYS = {"resume", "debug", "run_dir", "logger", "micro_batch_size", "gradient_checkpointing"}


class Stopped(Exception):
    """Raised by `Run.checkpoint` after writing it when a stop was requested (SIGINT)."""


class Run:
    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.stop_requested = False
        default = f"runs/{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.dir = Path(distributed.from_main(lambda: cfg.run_dir or default))  # rank 0's clock names it for all
        self.name = self.dir.name
        self.main = distributed.is_main()  # the one process that writes the run directory
        selected(cfg.logger)  # a missing tracker package fails before anything is written
        held_out = {cfg.eval_split: "eval_split", cfg.val_split: "val_split"}
        if getattr(cfg, "train_split", None) in held_out:
            raise UserError(f"train_split={cfg.train_split} is the run's {held_out[cfg.train_split]}: "
                            "training would see the tasks it is evaluated on")
        if self.main:
            self._claim_dir()
            (self.dir / "adapters").mkdir(exist_ok=True)
            (self.dir / "checkpoint").mkdir(exist_ok=True)
        distributed.barrier()  # the other ranks start once rank 0 has claimed the directory
        self.store = TraceStore(self.dir / "traces.sqlite" if self.main else ":memory:")
        self.metrics_path = self.dir / "metrics.jsonl"
        self.trackers = Trackers(cfg.logger if self.main else "jsonl", self.dir, self.name,
                                 cfg.model_dump(exclude=RESUME_FREE_KEYS))
        self._tasks: dict[str, list] = {}
        self._verifier = None
        self._retired: list[Path] = []

    @property
    def verifier(self):
        """The run's verifier (`verifier=`, pooled with verify_workers>1), built once and
        shared by the recipe and every evaluation."""
        if self._verifier is None:
            self._verifier = verifier_for(self.cfg.verifier, self.eval_tasks, self.cfg.verify_workers)
        return self._verifier

    @property
    def eval_tasks(self):
        """The test tasks: evaluated before training and, for the model the run selected,
        once at the end (loaded once)."""
        return self._held_out("test")

    @property
    def val_tasks(self):
        """The validation tasks every evaluation during the run uses: selection and early
        stopping happen here, never on the test tasks."""
        return self._held_out("validation")

    def _held_out(self, role: str):
        if role not in self._tasks:
            c = self.cfg
            split, limit = (c.eval_split, c.eval_limit) if role == "test" else (c.val_split, c.val_limit)
            self._tasks[role] = tasks_for(c, split, limit)
        return self._tasks[role]

    def critic(self, policy):
        """What evaluation puts between attempts (`build.turn_policy_for`)."""
        return turn_policy_for(self.cfg, policy, self.verifier)

    def _claim_dir(self) -> None:
        if check_run_dir(self.cfg, self.dir):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.dir / "config.yaml",
            f"# selfevolve run recipe={self.cfg.recipe}\n"
            + yaml.safe_dump({**self.cfg.model_dump(exclude=RESUME_FREE_KEYS), "run_dir": str(self.dir)},
                             sort_keys=False),
        )

    # --- metrics -----------------------------------------------------------------------

    def log(self, **metrics: Any) -> None:
        """Append one JSON line to metrics.jsonl, durably (a failed write is cut back off, so
        the file never ends in half a line), and send it to the trackers. Rank 0 only."""
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            size = f.tell()
            try:
                f.write(json.dumps(metrics) + "\n")
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                os.truncate(self.metrics_path, size)
                raise WriteFailed(e.errno, e.strerror, str(self.metrics_path)) from None
        self.trackers.log(metrics)

    def trained_on(self, trace_ids) -> None:
        """Record logged answers this run trained on (their trace ids, `sources.logged_tasks`):
        `trained_on.json`, the union over the run, so a resumed iteration adds nothing twice.
        The recipe calls it where it takes them; evolve's lineage reads it. Rank 0 writes."""
        if not self.main:
            return
        path = self.dir / "trained_on.json"
        had = set(json.loads(path.read_text())["trace_ids"]) if path.exists() else set()
        atomic_write(path, json.dumps({"trace_ids": sorted(had | set(trace_ids))}))

    def warn(self, step: int, why: str) -> None:
        """A warning about the run's health: printed in yellow to stderr and logged as
        {"step": step, "warning": why}, so the report and a later reader see it too."""
        if not self.main:
            return
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[yellow]warning (step {step}): {why}[/yellow]")
        self.log(step=step, warning=why)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def _metrics_lines(self) -> int:
        return len(self.metrics())

    # --- checkpoint / resume -----------------------------------------------------------

    def retire(self, path: str | Path) -> None:
        """Delete `path` (an adapter no longer served) once the next checkpoint is durable:
        until then the last checkpoint may still refer to it, and a run killed before the
        next one resumes from it."""
        self._retired.append(Path(path))

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Save the recipe's state atomically, with RNG states and the current lengths of
        the metrics log and the trace store; then delete what was retired before it. Rank 0
        writes; every rank stops here when a stop was requested."""
        if not self.main:
            self._retired.clear()
            if self.stop_requested:
                raise Stopped("stopped at a checkpoint")
            return
        full = {"recipe_state": state, "metrics_lines": self._metrics_lines(), "trace_seq": self.store.last_seq(),
                "rng_torch": torch.get_rng_state(), "rng_python": random.getstate()}
        path = self.dir / "checkpoint" / "state.pt"
        tmp = path.with_name("state.pt.tmp")
        try:
            torch.save(full, tmp)
        except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError
            tmp.unlink(missing_ok=True)
            raise WriteFailed(getattr(e, "errno", None) or errno.EIO, str(e).splitlines()[0][:120], str(path)) from None
        os.replace(tmp, path)
        for old in self._retired:
            shutil.rmtree(old, ignore_errors=True)
        self._retired.clear()
        if self.stop_requested:
            raise Stopped(
                f"stopped at a checkpoint; continue with: selfevolve run recipe={self.cfg.recipe} "
                f"run_dir={self.dir} resume=true"
            )

    def request_stop(self, signum=None, frame=None) -> None:
        """SIGINT handler: the first stops at the next checkpoint, a second one at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nstopping at the next checkpoint (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def rng_kept(self):
        """Run the block without moving torch's or Python's random state: a resumed run
        re-serves its adapter (loading one draws an initialisation that the loaded weights
        overwrite) where the uninterrupted run did so before its checkpoint, and the states
        `restore` set must reach the next step as they were saved."""
        py = random.getstate()
        with torch.random.fork_rng(devices=[]):
            yield
        random.setstate(py)

    def restore(self) -> dict[str, Any] | None:
        """On resume, roll metrics and traces back to the last checkpoint and return the
        recipe's state; on a fresh start (or a resume with no checkpoint yet), clear what a
        killed attempt left and return None."""
        path = self.dir / "checkpoint" / "state.pt"
        if not (self.cfg.resume and path.exists()):
            if self.main:
                self._truncate_metrics(0)
                self.store.truncate_after(0)
            return None
        full = torch.load(path, weights_only=False)
        if self.main:
            self._truncate_metrics(full["metrics_lines"])
            self.store.truncate_after(full["trace_seq"])
        torch.set_rng_state(full["rng_torch"])
        random.setstate(full["rng_python"])
        return full["recipe_state"]

    def _truncate_metrics(self, n: int) -> None:
        lines = self.metrics()[:n]
        atomic_write(self.metrics_path, "".join(json.dumps(m) + "\n" for m in lines))

    # --- evaluation and the end --------------------------------------------------------

    def evaluate(self, policy, which: str, round: int = 0, test: bool = False) -> dict[str, Any]:
        """Evaluate `policy` (greedy, `max_turns` attempts) on the validation tasks, or with
        `test=True` on the test tasks, which also draws the equal-budget baseline samples;
        store the traces (meta.eval=`which`, meta.split; one trace per baseline sample with
        meta.baseline=`which`), log and return the protocol metrics (selfevolve/evaluation/protocol.py).
        Under torchrun rank 0 evaluates (its policy serves what every rank's does) and sends
        the metrics to the others."""
        return distributed.from_main(lambda: self._evaluate(policy, which, round, test))

    def _evaluate(self, policy, which: str, round: int, test: bool) -> dict[str, Any]:
        c = self.cfg
        split = "test" if test else "validation"
        metrics, traces, samples = evaluate(
            policy, self.eval_tasks if test else self.val_tasks, self.verifier, max_turns=c.max_turns,
            critic=self.critic(policy), sampling=SamplingParams(temperature=0.0, max_new_tokens=c.max_new_tokens),
            feedback=feedback_kind(c.critic), baseline_temperature=c.baseline_temperature if test else None,
            seed=c.seed, bootstrap=c.bootstrap, recipe=c.recipe, run=self.name, round=round,
            meta={"eval": which, "split": split},
        )
        self.store.append([Trace(task=t.task, turns=[x], policy_version=t.policy_version, recipe=c.recipe,
                                 run=self.name, round=round, meta={"baseline": which, "split": split})
                           for t, turns in zip(traces, samples or []) for x in turns] + traces)
        self.log(eval=which, round=round, split=split, **metrics)
        return {"split": split, **metrics}

    def finish(self, before: dict | None, after: dict, selected_on: str | None = None, **extra: Any) -> dict[str, Any]:
        """Write summary.json: `before` and `after` are test evaluations (only the metric keys
        are kept), `selected_on` the split that chose the reported model (None: the run's
        final model, no choice made), `extra` whatever else the recipe reports. Rank 0 only."""
        self.trackers.close()
        if not self.main:
            return {}
        if after.get("split") != "test" or (before is not None and before.get("split") != "test"):
            raise ValueError("summary.json reports test evaluations only (Run.evaluate(..., test=True))")
        before, after = (None if before is None else metric_block(before)), metric_block(after)
        protocol = {"selected_on": selected_on or "none (the final model)", "reported_on": "test",
                    "feedback": after.get("feedback")}
        summary = {"recipe": self.cfg.recipe, "protocol": protocol, "before": before, "after": after, **extra}
        atomic_write(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print_summary(self.dir, before, after)
        try:  # the results are on disk already; a plotting problem must not fail the run
            from selfevolve.evaluation.report import (
                write_report,  # matplotlib: imported at the end, only if a run gets there
            )

            print(f"report: {write_report([self.dir])}")
        except Exception as e:  # noqa: BLE001
            print(f"warning: report not written ({type(e).__name__}: {e}); try `selfevolve report {self.dir}`",
                  file=sys.stderr)
        return summary

    def finish_selected(self, policy, before: dict, history: list[dict], lora: bool = True) -> dict[str, Any]:
        """Report the iteration validation ranks first. `history` holds each iteration's
        validation metrics (with "iteration"; its update saved at `adapters/iter-N`), the last
        entry the one `policy` serves. The selected update is served (verified, as every load)
        unless it is that one, evaluated once on the test tasks, and written by `finish`. Every
        rank calls it; the summary is returned on rank 0, {} on the others."""
        best = max(history, key=lambda h: h["acc_t1"])
        adapter = self.dir / "adapters" / f"iter-{best['iteration']}"
        if self.main:
            print(f"best iteration on validation: {best['iteration']} (acc_t1 {best['acc_t1']}); adapter {adapter}")
        if best["iteration"] != history[-1]["iteration"]:
            policy = saved_update(adapter, lora).serve(policy, f"iter-{best['iteration']}-selected")
        after = self.evaluate(policy, "after", round=best["iteration"], test=True)
        return self.finish(before=before, after=after, selected_on="validation", best_iteration=best["iteration"],
                           best_adapter=f"adapters/iter-{best['iteration']}", iterations=history)

    def progress(self, description: str, total: int | None, completed: int = 0):
        return progress(description, total if self.main else None, completed)


def check_run_dir(cfg: RecipeConfig, run_dir: Path) -> bool:
    """True when `run_dir` holds this run to resume, False when it is free for a new one;
    else a UserError (another run, another recipe, a changed config, resume=true with no
    run). Writes nothing: `nproc=N` checks before it starts torchrun."""
    cfg_path = run_dir / "config.yaml"
    mine = cfg.model_dump(exclude=RESUME_FREE_KEYS)
    if cfg_path.exists():
        if not cfg.resume:
            raise UserError(
                f"run_dir={run_dir} already holds a run; pass resume=true to continue it or choose another run_dir"
            )
        old = yaml.safe_load(cfg_path.read_text()) or {}
        if old.get("recipe") != cfg.recipe:
            raise UserError(f"run_dir={run_dir} holds a {old.get('recipe')!r} run, not {cfg.recipe!r}")
        defaults = type(cfg)().model_dump()  # a key newer than the run: its default is what the run had
        changed = sorted(k for k in set(old) | set(mine) if k not in RESUME_FREE_KEYS
                         and old.get(k, defaults.get(k)) != mine.get(k))
        if changed:
            k = changed[0]
            raise UserError(f"resume=true with a different config: {k}={mine.get(k)!r}, the run has {k}={old.get(k)!r}")
        return True
    if cfg.resume:
        raise UserError(f"resume=true but run_dir={run_dir} holds no run (no config.yaml)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run_dir={run_dir} exists and is not empty; choose another run_dir")
    return False


def metric_block(metrics: dict[str, Any]) -> dict[str, Any]:
    """The evaluation metrics of a dict that may hold more (an iteration's history entry)."""
    return {k: metrics[k] for k in KEYS + CRITIC_KEYS + PROTOCOL_KEYS if k in metrics}


def print_summary(run_dir: Path | str, before: dict | None, after: dict) -> None:
    """The protocol as two tables: the self-correction metrics (95% intervals, p_flip, the
    feedback label in the title), then revising vs sampling more at the same budget."""
    table = Table(title=f"{run_dir} — {after.get('split', 'test')} split, feedback: {after.get('feedback', '?')}")
    table.add_column("metric")
    if before:
        table.add_column("before", justify="right")
    table.add_column("after" if before else "value", justify="right")
    for k in KEYS + tuple(k for k in CRITIC_KEYS + ("p_flip",) if k in after):
        table.add_row(*[k] + ([with_interval(before, k)] if before else []) + [with_interval(after, k)])
    Console(stderr=False).print(table)
    budget = after.get("budget")
    if budget:
        k = budget["k"]
        same = Table(title=f"equal budget, k = {k} (baseline samples at temperature {budget['temperature']})")
        for col in ("method", "samples", "tokens", "accuracy"):
            same.add_column(col, justify="left" if col == "method" else "right")
        rows = [("first turn (greedy)", "first_turn", "acc_t1"), (f"revise: {k} turns", "refine", "acc_t2"),
                (f"maj@{k} (self-consistency)", "maj_at_k", "maj_at_k"),
                (f"pass@{k} (oracle pick)", "pass_at_k", "pass_at_k")]
        for name, spent, key in rows:
            b = budget[spent]
            same.add_row(name, str(b["samples"]), str(b["tokens"] if b["tokens"] is not None else "—"),
                         with_interval(after, key))
        Console(stderr=False).print(same)
