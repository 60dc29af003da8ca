"""VerifierPool: parallel verification in worker processes.

- order-preserving: `map(tasks, responses)` returns one Feedback per item, in order;
- work goes out in chunks (fewer round trips) but results come back one by one, so every
  item still has its own timeout clock;
- per-item timeout: an item that runs past `timeout` gets score 0 with the reason, its
  worker is killed and replaced, and the rest of the batch goes on (never hangs a run);
- crash isolation: a worker that dies (segfault, os._exit, out of memory) is reported on
  the item it was running, replaced, and the batch is not lost.

A VerifierPool is itself a Verifier (`verify`, `verify_batch`), so the loop, evaluation
and the recipes take it wherever they take a verifier (`verify_workers=N` on the CLI).

Workers are processes, not threads, because math-verify's timeouts use signals (which only
work in a process's main thread) and because a verifier may hold the GIL for long.
Workers start with `spawn`, so a parent that loaded torch and its thread pools forks
nothing it should not.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.connection import wait

from selfevolve.progress import progress
from selfevolve.types import Feedback, Task

STARTUP_S = 120  # a worker's imports, on a machine busy with training


def _worker(verifier, conn) -> None:
    """Say it is ready, then verify each item of each chunk received; send every result as
    soon as it exists."""
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for i, task, response in chunk:
            try:
                conn.send((i, verifier.verify(task, response), None))
            except Exception as e:  # reported on this item; the worker lives on
                conn.send((i, None, f"{type(e).__name__}: {e}"))


class VerifierPool:
    """Run `verifier.verify` over many items in `workers` processes.

    >>> from selfevolve.verifiers import NumericVerifier
    >>> with VerifierPool(NumericVerifier(), workers=2) as pool:
    ...     fbs = pool.map([Task(id="a", prompt="1+1", reference="2")] * 2, ["The answer is 2.", "The answer is 3."])
    >>> [f.score for f in fbs]
    [1.0, 0.0]
    """

    def __init__(self, verifier, workers: int | None = None, timeout: float = 30.0, chunk: int = 16):
        self.verifier = verifier
        self.chunk = chunk
        self.workers = workers or max(1, os.cpu_count() or 1)
        self.timeout = timeout
        self.ctx = mp.get_context("spawn")
        self.procs: list[_Worker] = []

    def _spawn(self) -> "_Worker":
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(self.verifier, child), daemon=True)
        p.start()
        child.close()
        return _Worker(p, parent)

    @staticmethod
    def _ready(w: "_Worker") -> "_Worker":
        """Wait until a new worker has imported what it needs and said so: its start-up time
        (seconds on a loaded machine) must not count against the first item's timeout."""
        try:
            if w.conn.poll(STARTUP_S) and w.conn.recv() == "ready":
                return w
        except (EOFError, OSError):
            pass
        w.proc.kill()
        w.proc.join()  # so the exit code below is known
        raise RuntimeError(
            f"a verifier worker died or did not start within {STARTUP_S} s (exit code {w.proc.exitcode})"
        )

    def start(self) -> "VerifierPool":
        new = [self._spawn() for _ in range(self.workers - len(self.procs))]  # they start in parallel
        self.procs += [self._ready(w) for w in new]
        return self

    def close(self) -> None:
        for w in self.procs:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self.procs:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
            w.conn.close()
        self.procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _replace(self, slot: int) -> None:
        w = self.procs[slot]
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()
        self.procs[slot] = self._ready(self._spawn())

    @property
    def name(self) -> str:
        return getattr(self.verifier, "name", type(self.verifier).__name__)

    def verify(self, task: Task, response: str) -> Feedback:
        return self.map([task], [response])[0]

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        return self.map(tasks, responses)

    def reference_response(self, task: Task) -> str:
        return getattr(self.verifier, "reference_response", lambda t: f"The answer is {t.reference}.")(task)

    def map(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        if not self.procs:
            self.start()
        results: list[Feedback | None] = [None] * len(tasks)
        todo = deque(range(len(tasks)))
        with progress("verify", total=len(tasks) if len(tasks) >= 64 else None) as bar:
            while todo or any(w.pending for w in self.procs):
                for slot, w in enumerate(self.procs):
                    if not w.pending and todo:  # chunks amortise the IPC; small enough to balance
                        size = max(1, min(self.chunk, len(todo) // (2 * len(self.procs))))
                        items = [todo.popleft() for _ in range(size)]
                        w = self._send(slot, [(i, tasks[i], responses[i]) for i in items])
                        w.pending, w.deadline = deque(items), time.monotonic() + self.timeout
                busy = [w for w in self.procs if w.pending]
                ready = wait(
                    [w.conn for w in busy] + [w.proc.sentinel for w in busy],
                    timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()),
                )
                for slot, w in enumerate(self.procs):
                    if w.pending and self._settle(slot, ready, results, todo):
                        bar.advance()
        return results  # type: ignore[return-value]

    def _send(self, slot: int, chunk: list) -> "_Worker":
        """Give worker `slot` a chunk; one that died while idle (killed between batches, out
        of memory) is replaced first, so no item is blamed for a crash it did not cause."""
        try:
            self.procs[slot].conn.send(chunk)
        except OSError:  # BrokenPipeError: nobody is reading
            self._replace(slot)
            self.procs[slot].conn.send(chunk)
        return self.procs[slot]

    def _settle(self, slot: int, ready: list, results: list, todo: deque) -> bool:
        """Worker `slot`'s next item: its answer if one came, else score 0 when the worker
        died or the item ran out of time (the worker is replaced and the rest of its chunk
        goes back to `todo`). True when an item was settled."""
        w = self.procs[slot]
        got = None
        if w.conn in ready:
            try:
                got = w.conn.recv()
            except (EOFError, OSError):
                got = None  # the worker died mid-item
        if got is not None:
            i, fb, err = got
            results[w.pending.popleft()] = (
                fb if fb is not None else Feedback(score=0.0, text=f"verifier error: {err}", details={"error": err})
            )
            w.deadline = time.monotonic() + self.timeout  # the next item's clock starts now
            return True
        if w.conn in ready or w.proc.sentinel in ready or not w.proc.is_alive():
            w.proc.join(timeout=5)
            fb = Feedback(score=0.0, text=f"verifier worker crashed (exit code {w.proc.exitcode})",
                          details={"error": "crashed", "exitcode": w.proc.exitcode})
        elif time.monotonic() >= w.deadline:
            fb = Feedback(score=0.0, text=f"verification timed out after {self.timeout:g} s",
                          details={"error": "timeout"})
        else:
            return False
        results[w.pending.popleft()] = fb
        todo.extendleft(reversed(w.pending))  # the rest of its chunk goes to others
        self._replace(slot)
        return True


class _Worker:
    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn
        self.pending: deque[int] = deque()  # items sent, in order, not yet answered
        self.deadline = 0.0
