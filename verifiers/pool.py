"""VerifierPool: parallel verification in worker processes.

- order-preserving: `map(tasks, responses)` returns one Feedback per item, in order;
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
from multiprocessing.connection import wait

from selfevolve.types import Feedback, Task


def _worker(verifier, conn) -> None:
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        i, task, response = item
        try:
            fb = verifier.verify(Task.model_validate(task), response)
            conn.send((i, fb.model_dump(), None))
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

    def __init__(self, verifier, workers: int | None = None, timeout: float = 30.0):
        self.verifier = verifier
        self.workers = workers or max(1, os.cpu_count() or 1)
        self.timeout = timeout
        self.ctx = mp.get_context("spawn")
        self.procs: list = []

    def _spawn(self):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(self.verifier, child), daemon=True)
        p.start()
        child.close()
        return [p, parent, None, 0.0]  # process, conn, current item index, deadline

    def start(self) -> "VerifierPool":
        while len(self.procs) < self.workers:
            self.procs.append(self._spawn())
        return self

    def close(self) -> None:
        for p, conn, _, _ in self.procs:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p, conn, _, _ in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
            conn.close()
        self.procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _replace(self, slot: int) -> None:
        p, conn = self.procs[slot][0], self.procs[slot][1]
        if p.is_alive():
            p.kill()
        p.join()
        conn.close()
        self.procs[slot] = self._spawn()

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
        pending = list(range(len(tasks)))[::-1]
        busy = 0
        while pending or busy:
            for slot, w in enumerate(self.procs):
                if w[2] is None and pending:
                    i = pending.pop()
                    w[1].send((i, tasks[i].model_dump(), responses[i]))
                    w[2], w[3] = i, time.monotonic() + self.timeout
                    busy += 1
            active = [w for w in self.procs if w[2] is not None]
            next_deadline = min(w[3] for w in active)
            ready = wait([w[1] for w in active] + [w[0].sentinel for w in active],
                         timeout=max(0.0, next_deadline - time.monotonic()))
            now = time.monotonic()
            for slot, w in enumerate(self.procs):
                i = w[2]
                if i is None:
                    continue
                got = None
                if w[1] in ready:
                    try:
                        got = w[1].recv()
                    except (EOFError, OSError):
                        got = None  # the worker died mid-item
                if got is not None:
                    _, fb, err = got
                    results[i] = Feedback.model_validate(fb) if fb is not None else \
                        Feedback(score=0.0, text=f"verifier error: {err}", details={"error": err})
                    w[2] = None
                    busy -= 1
                elif w[1] in ready or w[0].sentinel in ready or not w[0].is_alive():
                    w[0].join(timeout=5)
                    code = w[0].exitcode
                    results[i] = Feedback(score=0.0, text=f"verifier worker crashed (exit code {code})",
                                          details={"error": "crashed", "exitcode": code})
                    self._replace(slot)
                    busy -= 1
                elif now >= w[3]:
                    results[i] = Feedback(score=0.0, text=f"verification timed out after {self.timeout:g} s",
                                          details={"error": "timeout"})
                    self._replace(slot)
                    busy -= 1
        return results  # type: ignore[return-value]
