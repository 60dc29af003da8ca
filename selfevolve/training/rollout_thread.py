"""The serving thread: one thread drives the served policy — rollouts and adapter loads, in
the order they were submitted — so a recipe with bounded staleness (`max_staleness=K`) can
generate the next steps' rollouts while its learner trains (docs/architecture.md, "A recipe
step").

Why one thread and a queue, not a lock: an in-process engine cannot load an adapter while it
generates, and which adapter samples a rollout must not depend on timing. With one worker,
a rollout runs after every load submitted before it and before every load submitted after
it, so the adapter that samples each batch is fixed by the order of `submit` calls alone
(and the run is as reproducible as the synchronous one). Collectives (torchrun) stay on the
caller's thread: the serving thread only generates, verifies and loads.

After a job fails, every later job raises the same error instead of running: a rollout must
never be sampled by the adapter that a failed load left serving.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from selfevolve.training.publish import SavedUpdate
from selfevolve.types import AdapterServing


class ServingThread:
    """`submit(fn, *args)` runs `fn(policy, *args)` on the serving thread; `publish` queues a
    saved update's load; `drain()` waits for everything queued and returns the policy as it
    then serves (evaluate and checkpoint after it, from the caller's thread)."""

    def __init__(self, policy: AdapterServing):
        self.policy = policy
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfevolve-serving")
        self._pending: list[Future] = []
        self._failed: BaseException | None = None

    def submit(self, fn: Callable[..., Any], *args) -> Future:
        def job():
            if self._failed is not None:
                raise self._failed
            try:
                return fn(self.policy, *args)
            except BaseException as e:
                self._failed = e
                raise

        future = self._pool.submit(job)
        self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def publish(self, update: SavedUpdate, name: str, replaces: str | None = None) -> Future:
        """Queue the load (and canary check) of `update` under `name`: rollouts submitted after
        this call are sampled by it."""

        def load(policy: AdapterServing) -> None:
            self.policy = update.serve(policy, name, replaces)

        return self.submit(load)

    def drain(self) -> AdapterServing:
        """Wait for every queued job; raise the first failure; return the policy now served."""
        for future in self._pending:
            future.result()
        self._pending.clear()
        if self._failed is not None:
            raise self._failed
        return self.policy

    def close(self) -> None:
        """Stop: jobs not yet started are cancelled, a running one is waited for."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ServingThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
