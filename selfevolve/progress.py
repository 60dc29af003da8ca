"""Progress bars (rich) for long work. Quiet where nobody watches: `CI=true`, no TTY, or
SELFEVOLVE_QUIET=1. One function, used by generation, training and evaluation."""

from __future__ import annotations

import os
import sys
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
