"""OpenAIPolicy: any OpenAI-compatible endpoint (`vllm serve`, SGLang, `selfevolve serve`).

Generation is `/v1/chat/completions` through the `openai` client, one request per
conversation, sent concurrently so the server can batch them. Adapters follow vLLM's
runtime LoRA API: `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` (vLLM needs
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), after which the adapter is addressed as the request's
`model`. The verified-sync canary is `/v1/completions` with `echo=true, logprobs=1`, which
vLLM and selfevolve serve both answer with per-token log-probabilities of the prompt.

Every load is a new version with a name of its own on the server (`NAME@SESSION-N`, `served_names`);
nothing is reloaded under a name the server already used (reloading under the same name is
where servers serve the stale weights or hang), and at most `keep_adapters` versions stay
loaded (the least recently loaded inactive ones are unloaded first).
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

from selfevolve.errors import UserError
from selfevolve.types import Conversation, SamplingParams, Turn


def sampled_turn(choice) -> Turn:
    """A chat completion choice -> Turn. With log-probabilities, the sampled tokens come as
    ids where the server honours vLLM's `return_tokens_as_token_ids` ("token_id:N": vLLM,
    selfevolve serve), else as text (`Turn.tokens`): either way a learner can check that the
    tokens it trains on are the ones these log-probabilities belong to
    (`losses.behaviour_logprobs`)."""
    content = choice.logprobs.content if choice.logprobs and choice.logprobs.content else None
    return turn_from(choice.message.content or "", [t.token for t in content] if content else None,
                     [t.logprob for t in content] if content else None, choice.finish_reason)


def turn_from(text: str, tokens: list[str] | None, logprobs: list[float] | None, finish_reason: str | None) -> Turn:
    """An engine's answer -> Turn: tokens given as "token_id:N" become `token_ids`, others stay
    text (`tokens`)."""
    ids = None
    if tokens and all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens):
        ids, tokens = [int(t[9:]) for t in tokens], None
    return Turn(response=text.strip(), token_ids=ids, tokens=tokens, logprobs=logprobs,
                finish_reason="length" if finish_reason == "length" else "stop")


def request_sampling(s: SamplingParams, i: int) -> SamplingParams:
    """The sampling of the i-th request of a batch: its own seed (seed + i), as VLLMPolicy
    gives each request of a batch; one seed for all would give every prompt the same random
    stream (vLLM seeds each request's generator with it), i.e. correlated samples.

    >>> request_sampling(SamplingParams(seed=7), 2).seed, request_sampling(SamplingParams(), 2).seed
    (9, None)
    """
    return s if s.seed is None else s.model_copy(update={"seed": s.seed + i})


def client_key(api_key: str | None = None) -> str:
    """The key a client of an OpenAI-compatible server sends: `api_key`, else
    SELFEVOLVE_API_KEY, else OPENAI_API_KEY (vLLM without --api-key takes anything)."""
    return api_key or os.environ.get("SELFEVOLVE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"


class OpenAIPolicy:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 32, timeout: float = 300.0, keep_adapters: int = 4, max_retries: int = 2,
                 priority: int = 0):
        import httpx
        from openai import OpenAI

        base_url = base_url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        key = client_key(api_key)
        self.url = base_url
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
        self.concurrency = concurrency
        self.priority = priority  # sent with every generation request when not 0 (vLLM's field)
        try:
            served = self.client.models.list().data
            self.base_model = model or served[0].id
            # where the server loaded the model from (vLLM's and our `root`): a learner's base
            self.root = next((getattr(m, "root", None) for m in served if m.id == self.base_model), None)
        except Exception as e:  # connection refused, 401, ...: say which endpoint
            raise UserError(
                f"model={base_url}: no OpenAI-compatible server answers ({type(e).__name__}: {str(e)[:120]})"
            ) from None
        self.adapters: dict[str, str] = {}       # name -> path, oldest load first
        self.served_names: dict[str, str] = {}   # name -> the version's name on the server
        self.keep_adapters = keep_adapters
        self._versions = itertools.count(1)
        self._session = uuid.uuid4().hex[:6]     # another process's versions never collide with ours
        self._active: str | None = None

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def _model(self) -> str:
        return self.served_names[self._active] if self._active else self.base_model

    def _extra(self, **fields) -> dict | None:
        """The request's fields beyond the openai client's: `priority` when set."""
        fields |= {"priority": self.priority} if self.priority else {}
        return fields or None

    def _map(self, fn, items):
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(items)))) as pool:
            return list(pool.map(fn, items))

    def generate(self, conversations: list[Conversation], sampling: SamplingParams | None = None) -> list[list[Turn]]:
        """One request per conversation; the i-th gets seed + i (`request_sampling`)."""
        sampling = sampling or SamplingParams()
        return self._map(lambda ic: self.chat_one(ic[1], request_sampling(sampling, ic[0])),
                         list(enumerate(conversations)))

    def chat_one(self, conv: Conversation, sampling: SamplingParams) -> list[Turn]:
        """One /v1/chat/completions request: `sampling.n` Turns."""
        r = self.client.chat.completions.create(model=self._model(), messages=conv,
                                                temperature=sampling.temperature, top_p=sampling.top_p,
                                                max_tokens=sampling.max_new_tokens, n=sampling.n,
                                                seed=sampling.seed, stop=sampling.stop,
                                                logprobs=sampling.logprobs or None,
                                                extra_body=self._extra(return_tokens_as_token_ids=True)
                                                if sampling.logprobs else self._extra())
        return [sampled_turn(c) for c in r.choices]

    def complete(self, texts: list[str], sampling: SamplingParams | None = None) -> list[list[Turn]]:
        sampling = sampling or SamplingParams()
        return self._map(lambda it: self.complete_one(it[1], request_sampling(sampling, it[0])), list(enumerate(texts)))

    def complete_one(self, text: str, sampling: SamplingParams) -> list[Turn]:
        """One /v1/completions request: `sampling.n` Turns."""
        r = self.client.completions.create(model=self._model(), prompt=text, temperature=sampling.temperature,
                                           top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, n=sampling.n,
                                           seed=sampling.seed, stop=sampling.stop, extra_body=self._extra())
        return [Turn(response=c.text) for c in r.choices]

    def prompt_logprobs(self, text: str) -> list[float]:
        """log p(t_i | t_<i) for every token of `text` after the first, from the server's echoed
        prompt log-probabilities (`/v1/completions`, echo=true, logprobs=1)."""
        r = self.client.completions.create(model=self._model(), prompt=text, max_tokens=1, temperature=0.0, echo=True,
                                           logprobs=1, extra_body=self._extra())
        lps = r.choices[0].logprobs.token_logprobs[: r.usage.prompt_tokens]
        return [math.nan if lp is None else float(lp) for lp in lps[1:]]  # a gap is a failed check, not a skip

    # --- adapters (vLLM's runtime LoRA endpoints) ----------------------------------------

    def _post(self, path: str, body: dict) -> None:
        r = self.http.post(path, json=body)
        if r.status_code >= 400:
            raise UserError(f"{path} failed ({r.status_code}): {r.text[:200]}")

    def load_adapter(self, path: str, name: str) -> None:
        """Load `path` on the server as a new version of `name` and use it; the version it
        replaces, and the oldest inactive ones beyond `keep_adapters`, are unloaded after."""
        served = f"{name}@{self._session}-{next(self._versions)}"  # no dots: peft refuses them
        self._post("/load_lora_adapter", {"lora_name": served, "lora_path": str(path)})
        old = self.served_names.get(name)
        self.adapters.pop(name, None)
        self.adapters[name], self.served_names[name] = str(path), served
        self._active = name
        if old:
            self._post("/unload_lora_adapter", {"lora_name": old})
        for extra in [n for n in self.adapters if n != name][: max(0, len(self.adapters) - self.keep_adapters)]:
            self.unload_adapter(extra)

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UserError(f"adapter {name!r} is not loaded (loaded: {sorted(self.adapters)})")
        self._post("/unload_lora_adapter", {"lora_name": self.served_names[name]})
        self.adapters.pop(name)
        self.served_names.pop(name)
        if self._active == name:
            self._active = None

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise UserError(f"adapter {name!r} is not loaded (loaded: {sorted(self.adapters)})")
        self._active = name
