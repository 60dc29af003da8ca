"""FleetPolicy: one model served by several OpenAI-compatible replicas (`vllm serve
--enable-lora` or `selfevolve serve`, one per GPU or node), addressed as one policy.

    model=http://gpu0:8000,http://gpu1:8000 policy=openai

Requests: each conversation is one request, sent to the replica with the fewest requests
outstanding from this process (least outstanding work). A request that fails there (the
server is unreachable, times out, or answers 5xx) is retried on another replica and
reported; an unreachable replica leaves the fleet (it serves nothing, so it cannot serve a
stale model either), and so does one that answers 404 for the fleet's adapter (restarted:
it forgot its hot-loaded adapters, and would serve a stale model if asked for the base) —
the run goes on while one replica is left.

Adapters: a load goes to every replica, all or nothing (`publish.load_everywhere`): if one
refuses it or fails its canary, the others are rolled back to the adapter they had and the
sync raises SyncError naming the replica, or, with `on_sync_error=drop`, that replica leaves
the fleet and the others go on (logged). Each replica names every version anew
(`OpenAIPolicy.served_names`) and keeps at most `keep_adapters` loaded.

What is not promised: samples are not bitwise those of one server at the same seed (which
replica answers, and what it batches a request with, depend on timing).
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter

import httpx
import openai

from selfevolve.errors import UserError
from selfevolve.policies.openai import OpenAIPolicy, request_sampling
from selfevolve.training.publish import load_everywhere
from selfevolve.types import Conversation, SamplingParams, Turn

# What sends a request to another replica: transport failures, timeouts and server errors.
# A 4xx is the request's fault and would fail anywhere.
RETRYABLE = (openai.APIConnectionError, openai.InternalServerError, httpx.TransportError)
UNREACHABLE = (openai.APIConnectionError, httpx.TransportError)


class FleetPolicy:
    def __init__(self, urls: list[str], model: str | None = None, api_key: str | None = None,
                 on_sync_error: str = "raise", keep_adapters: int = 4, concurrency: int = 32,
                 timeout: float = 300.0, priority: int = 0):
        if on_sync_error not in ("raise", "drop"):
            raise UserError(f"on_sync_error={on_sync_error}: choose raise or drop")
        # no client-side retries: a failed request goes to another replica at once
        self.replicas = [OpenAIPolicy(u, model, api_key, concurrency, timeout, keep_adapters, max_retries=0,
                                     priority=priority)
                         for u in urls]
        bases = {(r.base_model, r.root) for r in self.replicas}
        if len(bases) > 1:
            raise UserError(f"model=: the replicas serve different models: {sorted(map(str, bases))}")
        self.base_model, self.root = bases.pop()
        self.on_sync_error = on_sync_error
        self.concurrency = concurrency * len(self.replicas)
        self.outstanding: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()   # failed requests per replica (retried elsewhere)
        self.dropped: dict[str, str] = {}         # replica url -> why it left the fleet
        self._lock = threading.Lock()

    # --- the adapter the fleet serves: every replica has the same ---------------------------

    @property
    def adapters(self) -> dict[str, str]:
        return self.replicas[0].adapters

    @property
    def active_adapter(self) -> str | None:
        return self.replicas[0].active_adapter

    def set_adapter(self, name: str | None) -> None:
        for r in self.replicas:
            r.set_adapter(name)

    def load_adapter(self, path: str, name: str) -> None:
        load_everywhere(self, path, name)

    def unload_adapter(self, name: str) -> None:
        for r in list(self.replicas):
            try:
                r.unload_adapter(name)
            except UNREACHABLE as e:
                self.drop(r, f"unreachable ({type(e).__name__})")

    def should_drop(self, error: Exception) -> bool:
        """Whether a replica that failed a sync with `error` leaves the fleet instead of
        failing it: with `on_sync_error=drop`, or when it is unreachable (it serves nobody,
        so it cannot serve a stale model) — while another replica is left."""
        return len(self.replicas) > 1 and (self.on_sync_error == "drop" or isinstance(error, UNREACHABLE))

    def drop(self, replica: OpenAIPolicy, why: str) -> None:
        """Take `replica` out of the fleet (never the last one), with a warning."""
        with self._lock:
            if replica not in self.replicas or len(self.replicas) == 1:
                return
            self.replicas.remove(replica)
            self.dropped[replica.url] = why
        warnings.warn(f"replica {replica.url} left the fleet: {why} ({len(self.replicas)} left)", stacklevel=2)

    # --- requests ---------------------------------------------------------------------------

    def _route(self, call):
        """`call(replica)` on the least busy replica; on a retryable failure, on another."""
        tried: set[str] = set()
        while True:
            with self._lock:
                free = [r for r in self.replicas if r.url not in tried]
                if not free:
                    raise UserError(f"every replica failed this request ({', '.join(sorted(tried))}); "
                                    f"dropped: {self.dropped or 'none'}")
                replica = min(free, key=lambda r: self.outstanding[r.url])
                self.outstanding[replica.url] += 1
            try:
                return call(replica)
            except openai.NotFoundError:  # a replica restarted where it was: it forgot the fleet's adapters
                if replica.active_adapter is None:
                    raise
                tried.add(replica.url)
                self.drop(replica, f"does not serve the fleet's adapter {replica.active_adapter!r} (restarted?)")
            except RETRYABLE as e:
                tried.add(replica.url)
                with self._lock:
                    self.failures[replica.url] += 1
                if isinstance(e, UNREACHABLE):
                    self.drop(replica, f"unreachable ({type(e).__name__})")
                else:
                    warnings.warn(f"replica {replica.url} failed a request ({type(e).__name__}); retried on "
                                  "another", stacklevel=2)
            finally:
                with self._lock:
                    self.outstanding[replica.url] -= 1

    _map = OpenAIPolicy._map  # fn over items on up to `concurrency` threads, in order

    def generate(self, conversations: list[Conversation], sampling: SamplingParams | None = None) -> list[list[Turn]]:
        s = sampling or SamplingParams()
        return self._map(lambda ic: self._route(lambda r: r.chat_one(ic[1], request_sampling(s, ic[0]))),
                         list(enumerate(conversations)))

    def complete(self, texts: list[str], sampling: SamplingParams | None = None) -> list[list[Turn]]:
        s = sampling or SamplingParams()
        return self._map(lambda it: self._route(lambda r: r.complete_one(it[1], request_sampling(s, it[0]))),
                         list(enumerate(texts)))

    def prompt_logprobs(self, text: str) -> list[float]:
        """The canary under the fleet's adapter, from one replica (`publish.load_everywhere`
        checks each replica by itself)."""
        return self._route(lambda r: r.prompt_logprobs(text))
