"""Progress bars (rich) for long work. Quiet where nobody watches: `CI=true`, no TTY, or
SELFEVOLVE_QUIET=1. One function, used by generation, training and evaluation; and a
stopwatch for the time a step spends in each phase."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager


def enabled() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("SELFEVOLVE_QUIET") == "1":
        return False
    return sys.stderr.isatty()


class _Bar:
    def __init__(self, prog=None, task=None):
        self.prog, self.task = prog, task

    def advance(self, n: int = 1) -> None:
        if self.prog is not None:
            self.prog.advance(self.task, n)


@contextmanager
def progress(description: str, total: int | None, completed: int = 0):
    """`with progress("generate", total=8) as bar: ... bar.advance()`; total=None shows
    nothing (work too short to need a bar)."""
    if total is None or not enabled():
        yield _Bar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=True) as prog:
        yield _Bar(prog, prog.add_task(description, total=total, completed=completed))


class Stopwatch:
    """Seconds per named phase of a step, for the log: `with clock("train"): ...`, then
    `run.log(**clock.lap())` gives `time_<name>` for every phase named at construction (0.0 if
    it did not run since the last lap) and starts the next lap."""

    def __init__(self, *phases: str):
        self.phases, self.spent = phases, dict.fromkeys(phases, 0.0)

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.spent[phase] = self.spent.get(phase, 0.0) + seconds

    def lap(self) -> dict[str, float]:
        out = {f"time_{k}": round(v, 3) for k, v in self.spent.items()}
        self.spent = dict.fromkeys(self.phases, 0.0)
        return out
