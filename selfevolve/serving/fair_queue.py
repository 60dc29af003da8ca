"""FairQueue: how `selfevolve serve`'s one model thread picks its next batch.

First come, first served lets one request that expands into many sequences (a completions
request with 128 prompts × n=16, or a round of `evolve` sampling) hold every other client
until all of it is generated. Here each request keeps its own queue of jobs, and a batch is
filled round-robin — one job from each waiting request in turn, requests that were served
going to the back — up to a budget of sequences (a job of `n` samples counts n). A small
request that arrives behind a large one is in the next batch, not after the large one ends;
a single job larger than the budget still runs, alone.

Requests also carry a priority (vLLM's request field: lower is sooner, default 0): a batch
holds jobs of the lowest priority waiting only, so background work — an evolve round's
sampling, sent with priority 1 — runs only while no user request is queued, in batches of
at most `background` sequences, and a user request waits at most for the batch in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class FairQueue:
    def __init__(self):
        self.requests: dict[Any, deque] = {}  # request -> its (job, size) in order; dict order is the turn order
        self.priority: dict[Any, int] = {}  # request -> its priority
        self.waiting = asyncio.Event()

    def put(self, request: Any, job: Any, size: int = 1, priority: int = 0) -> None:
        self.requests.setdefault(request, deque()).append((job, size))
        self.priority[request] = priority
        self.waiting.set()

    def sequences(self) -> int:
        return sum(size for q in self.requests.values() for _, size in q)

    async def take(self, budget: int, wait_s: float = 0.0, background: int | None = None) -> list:
        """The next batch: waits for a job, then up to `wait_s` for more to fill `budget`
        (`background`, where given, for a batch of priority > 0: shorter, so a user's request
        that arrives while it runs waits less)."""
        await self.waiting.wait()
        if wait_s > 0 and self.sequences() < budget:
            await asyncio.sleep(wait_s)
        batch, used, served = [], 0, []
        first = min(self.priority[r] for r, q in self.requests.items() if q)
        if first > 0 and background is not None:
            budget = min(budget, background)
        while True:
            took = False
            for request, q in self.requests.items():
                if not q or self.priority[request] != first:
                    continue
                job, size = q[0]
                if batch and used + size > budget:
                    continue
                q.popleft()
                batch.append(job)
                used += size
                took = True
                if request not in served:
                    served.append(request)
            if not took or used >= budget:
                break
        for request in served:  # to the back of the turn order; an emptied request leaves it
            q = self.requests.pop(request)
            if q:
                self.requests[request] = q
            else:
                del self.priority[request]
        if not self.requests:
            self.waiting.clear()
        return batch
