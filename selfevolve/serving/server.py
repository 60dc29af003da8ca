"""The serving engine behind `selfevolve serve` (app.py is its HTTP layer): the policy, one
model-owning worker thread, the request queue and batching, refinement, request logging to
the trace store, and adapters loaded at runtime (vLLM's /v1/load_lora_adapter shapes).

Batching: requests from concurrent clients queue up; the worker takes up to `max_batch`
sequences at a time (waiting at most `batch_wait_ms` for more), round-robin over the waiting
requests so a large one cannot hold the others (`fair_queue.FairQueue`), groups those with the
same adapter and sampling settings, and answers each group with one batched generate call.
A bad request raises `HTTPError`; app.py turns it into the HTTP response.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, Field, ValidationError

from selfevolve.build import critic_from_config, served_policy, verifier_for
from selfevolve.config import FeedbackKeys, ModelKeys
from selfevolve.data.sources import default_verifier, request_task
from selfevolve.data.store import TraceStore
from selfevolve.errors import UserError
from selfevolve.loop import refine_batch
from selfevolve.models import BUNDLED
from selfevolve.serving.access import confined_root, exposure
from selfevolve.serving.fair_queue import FairQueue
from selfevolve.serving.streaming import decode_exact
from selfevolve.serving.wire import ChatRequest, CompletionRequest, FeedbackRequest, LoadAdapter, Refine
from selfevolve.types import Feedback, SamplingParams, Servable, Task, Trace, Turn, cut_at_stop

REFINE_SUFFIX = "+refine"


class ServeConfig(ModelKeys, FeedbackKeys):
    """`selfevolve serve`'s keys: the served model, the refinement settings, the HTTP side.
    It writes every request to the trace store (`traces=`); run-directory keys are refused."""

    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 exposes it to the network)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` (or set SELFEVOLVE_API_KEY)")
    insecure: bool = Field(False, description="allow a non-loopback host without an api_key (anyone who reaches it "
                           "is served)")
    allow_adapter_updates: bool | None = Field(
        None, description="accept /v1/load_lora_adapter and /v1/unload_lora_adapter (default: on when the server "
        "listens on loopback only or requires an api_key; as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)")
    adapter_root: str | None = Field(None, description="adapters load only from under this directory (a relative "
                                     "lora_path is taken from here)")
    name: str | None = Field(None,
                             description="the base model's id in /v1/models (default: the model directory's name)")
    max_batch: int = Field(64, ge=1, description="sequences generated together at most (a request of n samples "
                           "counts n); waiting requests share batches round-robin (fair_queue.FairQueue)")
    background_batch: int = Field(16, ge=1, description="sequences a batch of background work (priority > 0) holds "
                                  "at most: a user's request waits for no more than that in flight")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the worker waits to fill a batch")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(16, ge=1, description="largest n a request may ask for")
    max_request_tokens: int = Field(262_144, ge=1, description="largest work one request may ask for: prompts × n × "
                                    "max_tokens (generated tokens at most)")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted")
    max_turns_limit: int = Field(8, ge=1, description="largest refine max_turns a request may ask for")
    max_turns: int = Field(3, ge=1, description="default attempts for refinement requests")
    traces: str = Field("runs/serve/traces.sqlite", description="TraceStore every request is logged to (each "
                        "answer a trace; POST /v1/feedback attaches a verdict later)")
    log_traces: bool = Field(True, description="log plain chat/completions requests as traces too (false: only "
                             "refinement traces)")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# --- batching ---------------------------------------------------------------------------------


class BatchKey(NamedTuple):
    """Jobs with equal keys are answered in one batched call: the same adapter and sampling
    settings (and, for refinement, the same attempts, critic and system message). A plain
    request's seed is not part of its key: it travels with the request, and each request
    is sampled from its own seed in any batch (`HFPolicy.generate`'s `seeds`)."""

    adapter: str | None = None
    sampling: str = ""  # SamplingParams as JSON (hashable)
    max_turns: int | None = None
    critic: str | None = None
    system: str | None = None  # a refinement request's system message


def unseeded(sampling: SamplingParams) -> str:
    """The sampling settings as a batch key, without the seed."""
    return sampling.model_copy(update={"seed": None}).model_dump_json()


SERIAL = BatchKey()  # adapter load/unload and canary calls: run one by one, between batches


class Failed(NamedTuple):
    error: BaseException


def _call(fn):
    """Run one queued adapter call; its exception is returned (`Failed`), not raised, so the
    calls batched with it still run and answer their own clients."""
    try:
        return fn()
    except Exception as e:  # delivered to this call's client alone
        return Failed(e)


@dataclass
class Job:
    kind: str  # "chat" | "complete" | "refine" | "call"
    key: BatchKey
    payload: Any
    future: asyncio.Future = field(default=None)


def servable(policy, name: str) -> Servable:
    """`policy`, checked once for everything the server calls on it (types.Servable)."""
    if not isinstance(policy, Servable):
        raise UserError(f"policy={name}: {type(policy).__name__} cannot be served by selfevolve serve "
                        "(it is not a types.Servable); for vLLM run `vllm serve MODEL --enable-lora` and "
                        "`selfevolve serve model=http://HOST:PORT/v1` in front of it")
    return policy


class Server:
    """The policy, a single model-owning worker thread, and the request queue; built from
    `exposure`, `confined_root`, `servable` and the trace store."""

    def __init__(self, cfg: ServeConfig, policy=None):
        self.cfg = cfg
        self.api_key, self.adapter_updates = exposure(cfg)
        self.adapter_root = confined_root(cfg.adapter_root)
        self.policy = self.engine_policy(policy or served_policy(cfg))
        self.name, self.root = self.identity()
        Path(cfg.traces).parent.mkdir(parents=True, exist_ok=True)
        self.store = TraceStore(cfg.traces)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfevolve-model")
        self.queue: FairQueue | None = None
        self.versions = {n: adapter_version(n, str(p)) for n, p in self.policy.adapters.items()}
        self._critics: dict[str, Any] = {}
        self._verifier = None
        self._verifiers: dict[str, Any] = {}

    gateway = False  # gateway.Gateway: the engine is another server, requests pass through to it

    def engine_policy(self, policy):
        return servable(policy, self.cfg.policy)

    def identity(self) -> tuple[str, str]:
        """The base model's id in /v1/models and where it was loaded from (vLLM's `root`)."""
        path = str(self.policy.path)
        return self.cfg.name or Path(path).name, self.cfg.model if self.cfg.model in BUNDLED else path

    def count_prompt(self, conv) -> int:
        """The prompt's length in tokens, checked against the context (a 400 when too long)."""
        n = len(self.policy.encode_prompts([conv])[0])
        self.check_length(n)
        return n

    async def models_list(self) -> list[dict]:
        return [{"id": m, "object": "model", "created": int(time.time()), "owned_by": "selfevolve",
                 "root": self.root} for m in self.models()]

    @staticmethod
    def validated(model: type[BaseModel], data: dict):
        try:
            return model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise HTTPError(400, f"{where}: {first['msg']}" if where else first["msg"]) from None

    # resolved lazily: a server without refinement requests never builds them
    @property
    def verifier(self):
        if self._verifier is None:
            self._verifier = verifier_for(self.cfg.verifier, None)
        return self._verifier

    def verifier_of(self, task: Task):
        """The verifier that scores a logged answer: `verifier=`, or from the task when auto
        (tests: the code sandbox; a reference: math)."""
        name = self.cfg.verifier if self.cfg.verifier != "auto" else default_verifier([task])
        if name not in self._verifiers:
            self._verifiers[name] = verifier_for(name, [task])
        return self._verifiers[name]

    def critic(self, name: str):
        if name not in self._critics:
            self._critics[name] = critic_from_config(self.cfg.model_copy(update={"critic": name}), self.policy,
                                                     self.verifier)
        return self._critics[name]

    def models(self) -> list[str]:
        return [self.name, self.name + REFINE_SUFFIX, *self.policy.adapters]

    def adapter_for(self, model: str) -> str | None:
        base = model[: -len(REFINE_SUFFIX)] if model.endswith(REFINE_SUFFIX) else model
        if base == self.name:
            return None
        if base in self.policy.adapters:
            return base
        raise HTTPError(404, f"model {model!r} does not exist; available: {', '.join(self.models())}",
                        "not_found_error")

    # --- the worker ---------------------------------------------------------------------------

    async def submit(self, kind: str, key: BatchKey, payload: Any, request: Any = None, size: int = 1,
                     priority: int = 0):
        """Queue one job of `size` sequences for the model thread and wait for its result;
        jobs of one `request` (a completions request's prompts) share its turn, and a lower
        `priority` goes first (FairQueue)."""
        job = Job(kind, key, payload, asyncio.get_running_loop().create_future())
        self.queue.put(request if request is not None else object(), job, size, priority)
        return await job.future

    def start(self) -> asyncio.Task:
        """A fresh queue and the worker task on the running event loop (the app's lifespan)."""
        self.queue = FairQueue()
        return asyncio.create_task(self.worker())

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self.queue.take(self.cfg.max_batch, self.cfg.batch_wait_ms / 1000, self.cfg.background_batch)
            groups: dict[tuple, list[Job]] = {}
            for j in jobs:
                groups.setdefault((j.kind, j.key), []).append(j)
            for (kind, key), group in groups.items():
                try:
                    results = await loop.run_in_executor(self.executor, self._run, kind, key,
                                                         [j.payload for j in group])
                except Exception as e:  # one bad group must not stop the server
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                for j, r in zip(group, results):
                    if j.future.done():
                        continue
                    if isinstance(r, Failed):  # one adapter call's failure is its own client's
                        j.future.set_exception(r.error)
                    else:
                        j.future.set_result(r)

    def _run(self, kind: str, key: BatchKey, payloads: list) -> list:
        """In the model thread: one batched call for a group of requests."""
        if kind == "call":  # adapter load/unload: serialised with generation, each with its own fate
            return [_call(fn) for fn in payloads]
        if key.adapter is not None and key.adapter not in self.policy.adapters:
            raise HTTPError(404, f"the model {key.adapter!r} does not exist (unloaded while this request waited)",
                            "not_found_error")
        self.policy.set_adapter(key.adapter)
        version = self.versions.get(key.adapter)  # what answers, fixed here: swaps run between batches
        sampling = SamplingParams.model_validate_json(key.sampling)
        if kind in ("chat", "complete"):  # payloads: (conversation or token ids, the request's seed, its stream)
            seeds = [seed for _, seed, _ in payloads]
            emits = [e for _, _, e in payloads]
            call = self.policy.generate if kind == "chat" else self.policy.complete
            answers = call([x for x, _, _ in payloads], sampling, seeds=None if seeds == [None] * len(seeds) else seeds,
                           on_token=emits if any(emits) else None)
            return [(version, turns) for turns in answers]
        emits = [e for _, e in payloads]  # payloads: (task, its stream)
        traces = refine_batch([t for t, _ in payloads], self.policy, self.verifier, self.critic(key.critic),
                              key.max_turns, sampling=sampling, system=key.system, recipe="serve",
                              on_token=emits if any(emits) else None,
                              run="serve", meta={"source": "serve", "kind": "refine"})
        for t in traces:
            t.policy_version = version
        self.store.append(traces)
        return traces

    # --- request handling ---------------------------------------------------------------------

    def sampling(self, temperature, top_p, max_tokens, n, seed, logprobs=False, top: int = 0) -> SamplingParams:
        if max_tokens > self.cfg.max_tokens_limit:
            raise HTTPError(400, f"max_tokens={max_tokens} exceeds this server's limit of {self.cfg.max_tokens_limit}")
        if n > self.cfg.max_n:
            raise HTTPError(400, f"n={n} exceeds this server's limit of {self.cfg.max_n}")
        return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, n=n, seed=seed,
                              logprobs=bool(logprobs), top_logprobs=top)

    def check_work(self, prompts: int, n: int, max_tokens: int) -> None:
        if prompts * n * max_tokens > self.cfg.max_request_tokens:
            raise HTTPError(400, f"{prompts} prompt(s) × n={n} × max_tokens={max_tokens} = {prompts * n * max_tokens} "
                            f"tokens exceeds this server's per-request limit of {self.cfg.max_request_tokens}")

    def check_length(self, ids_len: int) -> None:
        limit = self.policy.max_positions
        if ids_len + 1 > limit:
            raise HTTPError(400, f"the prompt is {ids_len} tokens; this model's context is {limit} tokens")

    async def chat(self, req: ChatRequest, emit=None) -> dict:
        """The response to a chat request. `emit(choice, token_id)`, where given, receives each
        token as it is generated; a refinement's attempts before its last allowed one, which
        may or may not be its answer, come as `emit(("draft", turn), token_id)`."""
        if req.tools or req.tool_choice not in (None, "none"):
            raise HTTPError(400, "tools / tool_choice are not supported by selfevolve serve (the model has no "
                            "tool-calling format)")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise HTTPError(400, f"response_format type {req.response_format.get('type')!r} is not supported "
                            "(only text)")
        adapter = self.adapter_for(req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(256, self.cfg.max_tokens_limit)
        if req.top_logprobs and not req.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs=true")
        sampling = self.sampling(req.temperature, req.top_p, max_tokens, req.n, req.seed, req.logprobs,
                                 req.top_logprobs or 0)
        conv = [m.model_dump() for m in req.messages]
        prompt_tokens = self.count_prompt(conv)
        refine = (
            req.refine
            if isinstance(req.refine, Refine)
            else (Refine() if req.refine or req.model.endswith(REFINE_SUFFIX) else None)
        )
        created = int(time.time())
        if refine is None:
            version, turns = await self.submit("chat", BatchKey(adapter, unseeded(sampling)), (conv, req.seed, emit),
                                               size=req.n, priority=req.priority)
            turns = [cut_at_stop(t, req.stop) for t in turns]
            choices = [self._chat_choice(i, t, max_tokens, req.logprobs, req.return_tokens_as_token_ids)
                       for i, t in enumerate(turns)]
            out = self._chat_response(req.model, created, choices, prompt_tokens, turns)
            ids = await self.log("chat", [request_task(conv, req)], [turns], [version])
            if ids:
                out["selfevolve"] = {"trace_id": ids[0], "trace_ids": ids}
            return out
        if req.n != 1:
            raise HTTPError(400, "refinement returns one answer; use n=1")
        if req.stop:
            raise HTTPError(400, "stop does not apply to a refinement (each attempt is a whole answer); leave it out")
        if [m["role"] for m in conv] not in (["user"], ["system", "user"]):  # nothing accepted and then dropped
            raise HTTPError(400, "a refinement request is one user message (optionally after a system message)")
        max_turns = refine.max_turns or self.cfg.max_turns
        if max_turns > self.cfg.max_turns_limit:
            raise HTTPError(400,
                            f"refine.max_turns={max_turns} exceeds this server's limit of {self.cfg.max_turns_limit}")
        critic = refine.critic or self.cfg.critic
        if critic == "judge" and not self.cfg.judge:
            raise HTTPError(400, "critic=judge needs a judge model: this server was started without judge=")
        if critic == "verifier" and refine.reference is None:
            raise HTTPError(400, "critic=verifier needs refine.reference (the expected answer)")
        task = request_task(conv, req, refine.reference)
        system = conv[0]["content"] if conv[0]["role"] == "system" else None  # reaches every attempt
        last = max_turns - 1  # the attempt that is the answer whatever it says: streamed as the answer
        drafts = None if emit is None else (lambda turn, token: emit(0 if turn == last else ("draft", turn), token))
        trace = await self.submit("refine", BatchKey(adapter, sampling.model_dump_json(), max_turns, critic, system),
                                  (task, drafts), priority=req.priority)
        choice = self._chat_choice(0, trace.turns[-1], max_tokens, False)
        out = self._chat_response(req.model, created, [choice], prompt_tokens, trace.turns)
        out["selfevolve"] = {"trace_id": trace.id, "turns": len(trace.turns), "scores": [t.score for t in trace.turns],
                             "critiques": [t.critique.text if t.critique else None for t in trace.turns]}
        return out

    def _chat_choice(self, i, turn, max_tokens, logprobs, as_ids: bool = False) -> dict:
        choice = {"index": i, "message": {"role": "assistant", "content": turn.response},
                  "finish_reason": turn.finish_reason or "stop", "logprobs": None}
        if logprobs and turn.logprobs is not None:
            tok = self.policy.tokenizer
            name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: tok.decode([t]))
            tops = turn.top_logprobs or [{} for _ in turn.token_ids]
            choice["logprobs"] = {"content": [
                {"token": name(t), "logprob": lp, "bytes": None,
                 "top_logprobs": [{"token": name(k), "logprob": v, "bytes": None} for k, v in top.items()]}
                for t, lp, top in zip(turn.token_ids, turn.logprobs, tops)]}
        return choice

    def _chat_response(self, model, created, choices, prompt: int, turns) -> dict:
        completion = sum(len(t.token_ids or []) for t in turns)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    async def complete(self, req: CompletionRequest, emit=None) -> dict:
        """Continue each prompt (a text or token ids, as OpenAI and vLLM take them). `echo`
        puts the prompt before the answer; with max_tokens=0 the prompt alone (its log-probs
        score it; nothing is logged). `logprobs=k`: each returned token, its log-prob, the k
        most likely tokens at its position and its offset in the text, as OpenAI's legacy
        completions format defines them. The answer's text is its returned tokens decoded.
        `emit(choice, token_id)`, where given, receives each token as it is generated."""
        adapter = self.adapter_for(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise HTTPError(400, "max_tokens=0 returns nothing without echo=true")
        top = req.logprobs or 0
        sampling = self.sampling(req.temperature, req.top_p, max(req.max_tokens, 1), req.n, req.seed,
                                 req.logprobs is not None, top)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        if not prompts or not all(prompts):
            raise HTTPError(400, "prompt is empty")
        tok = self.policy.tokenizer
        vocab = len(tok)
        for x in prompts:
            if isinstance(x, list) and not all(0 <= i < vocab for i in x):
                raise HTTPError(400, f"prompt: token ids must be in [0, {vocab})")
        ids = [x if isinstance(x, list) else tok(x)["input_ids"] for x in prompts]
        texts = [x if isinstance(x, str) else tok.decode(x, skip_special_tokens=True) for x in prompts]
        for x in ids:
            self.check_length(len(x))
        request = object()  # its prompts take one turn between other clients' requests
        self.check_work(len(prompts), req.n, req.max_tokens)
        if req.max_tokens == 0:
            nothing = [Turn(response="", token_ids=[], logprobs=[]) for _ in range(req.n)]
            results = [(self.versions.get(adapter), nothing) for _ in ids]
        else:
            key = BatchKey(adapter, unseeded(sampling))  # each prompt the request's seed, as vLLM
            each = [None if emit is None else (lambda s, t, i=i: emit(i * req.n + s, t)) for i in range(len(ids))]
            results = await asyncio.gather(*[self.submit("complete", key, (x, req.seed, e), request, req.n,
                                                         req.priority) for x, e in zip(ids, each)])
        versions = [v for v, _ in results]
        exact = lambda t: t if t.token_ids is None else t.model_copy(  # noqa: E731 - the tokens' own text, untrimmed
            update={"response": decode_exact(tok, t.token_ids)})
        results = [[cut_at_stop(exact(t), req.stop) for t in turns] for _, turns in results]
        echoed = {}
        if req.echo and req.logprobs is not None:
            echoed = {i: await self.submit("call", SERIAL, lambda x=x, a=adapter: self._prompt_lps(x, a, top),
                                           priority=req.priority) for i, x in enumerate(ids)}
        choices, completion = [], 0
        for i, (text, turns) in enumerate(zip(texts, results)):
            for t in turns:
                completion += len(t.token_ids or [])
                choice = {"index": len(choices), "text": (text if req.echo else "") + t.response,
                          "finish_reason": t.finish_reason or "stop", "logprobs": None}
                if req.logprobs is not None:
                    choice["logprobs"] = self._completion_logprobs(
                        echoed.get(i), text if req.echo else "", t)
                choices.append(choice)
        prompt_tokens = sum(len(x) for x in ids)
        logged = [] if req.max_tokens == 0 else await self.log(
            "completion", [request_task(x, req) for x in texts], results, versions)
        return {
            **({"selfevolve": {"trace_id": logged[0], "trace_ids": logged}} if logged else {}),
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
        }

    async def log(self, kind: str, tasks: list[Task], answers: list[list[Turn]],
                  versions: list[str | None]) -> list[str]:
        """Every answer becomes a trace (one per choice) in the store, with the version that
        answered it (`adapter_version`; None: the base model), scored by the verifier where
        its request carried a reference or tests, and appended before the response goes
        out, so its id is valid for /v1/feedback at once. Off the model thread (a code
        verifier runs tests). Returns the trace ids ([] with log_traces=false)."""
        if not self.cfg.log_traces:
            return []
        traces = [Trace(task=task, turns=[turn], policy_version=version, recipe="serve", run="serve",
                        meta={"source": "serve", "kind": kind})
                  for task, turns, version in zip(tasks, answers, versions) for turn in turns]

        def score_and_append():
            for t in traces:
                if t.task.reference is not None or t.task.tests:
                    t.turns[-1].feedback = self.verifier_of(t.task).verify(t.task, t.final)
            self.store.append(traces)

        await asyncio.get_running_loop().run_in_executor(None, score_and_append)
        return [t.id for t in traces]

    async def feedback(self, req: FeedbackRequest) -> dict:
        """Attach a user's verdict to a logged answer (`TraceStore.add_feedback`)."""
        verdict = Feedback(score=req.score, text=req.text, source="user")
        trace = await asyncio.get_running_loop().run_in_executor(None, self.store.add_feedback, req.trace_id,
                                                                 verdict)
        if trace is None:
            raise HTTPError(404, f"no logged trace with id {req.trace_id!r}", "not_found_error")
        return {"object": "feedback", "trace_id": trace.id, "score": req.score}

    def _prompt_lps(self, ids: list[int], adapter: str | None, top: int):
        self.policy.set_adapter(adapter)
        return self.policy.prompt_token_logprobs(ids, top)

    def _completion_logprobs(self, echoed, prefix: str, turn: Turn) -> dict:
        """OpenAI's legacy `logprobs` object for a choice: the echoed prompt's tokens (their
        log-probs: None for the first) then the answer's, each with its top tokens ({text:
        log-prob}) and its offset in the choice's text (the length of the text decoded before
        it; the prompt's are offsets into `prefix`)."""
        tok = self.policy.tokenizer
        p_ids, p_lps, p_tops = echoed or ([], [], [])
        ids = list(turn.token_ids or [])
        toks = [tok.decode([x], skip_special_tokens=True) for x in p_ids + ids]
        tops = list(p_tops) + list(turn.top_logprobs or [{} for _ in ids])
        offsets = [min(len(s), len(prefix)) for s in tok.batch_decode([p_ids[:k] for k in range(len(p_ids))],
                                                                         skip_special_tokens=True)]
        offsets += [len(prefix) + len(s) for s in tok.batch_decode([ids[:k] for k in range(len(ids))],
                                                                     skip_special_tokens=True)]
        return {"tokens": toks, "token_logprobs": list(p_lps) + list(turn.logprobs or []),
                "top_logprobs": [None if t is None else {tok.decode([k], skip_special_tokens=True): v
                                                         for k, v in t.items()} for t in tops],
                "text_offset": offsets}

    def check_adapter_updates(self) -> None:
        if not self.adapter_updates:
            raise HTTPError(403, "adapter updates are off on this server (start it with allow_adapter_updates=true, "
                            "or with an api_key)", "permission_error")

    def adapter_path(self, lora_path: str) -> str:
        """`lora_path` confined to `adapter_root` (when set): a path outside it is refused
        without saying anything about what is there."""
        if "\x00" in lora_path:
            raise HTTPError(400, "lora_path contains a NUL byte")
        if self.adapter_root is None:
            return lora_path
        path = (self.adapter_root / lora_path).resolve()
        inside = path.is_relative_to(self.adapter_root)
        if inside and path.is_dir():  # a file that is a symlink out of the root escapes it as well
            inside = all(f.resolve().is_relative_to(self.adapter_root) for f in path.iterdir())
        if not inside:
            raise HTTPError(403, "lora_path is outside this server's adapter_root", "permission_error")
        return str(path)

    async def load_adapter(self, req: LoadAdapter) -> str:
        self.check_adapter_updates()
        if not req.lora_path:
            raise HTTPError(400, "lora_path is required")
        if req.lora_name in (self.name, self.name + REFINE_SUFFIX):
            raise HTTPError(400, f"lora_name {req.lora_name!r} is the base model's name")
        if req.lora_name.endswith(REFINE_SUFFIX):  # `NAME+refine` asks for refinement with adapter NAME
            raise HTTPError(400, f"lora_name {req.lora_name!r} ends in {REFINE_SUFFIX!r}, which requests refinement")
        path = self.adapter_path(req.lora_path)
        if req.lora_name in self.policy.adapters and not req.load_inplace:
            raise HTTPError(400, f"adapter {req.lora_name!r} is already loaded; load_inplace=true replaces it")

        def load():  # all or nothing (HFPolicy.load_adapter): a failed load leaves the model as it was
            try:
                self.policy.load_adapter(path, req.lora_name)
                self.versions[req.lora_name] = adapter_version(req.lora_name, path)
            except UserError as e:
                return HTTPError(400, str(e))
            finally:
                self.policy.set_adapter(None)

        err = await self.submit("call", SERIAL, load)
        if err:
            raise err
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload_adapter(self, req: LoadAdapter) -> str:
        self.check_adapter_updates()
        if req.lora_name not in self.policy.adapters:
            raise HTTPError(404, f"adapter {req.lora_name!r} is not loaded", "not_found_error")
        def unload():  # checked again in the model thread: another unload may have come first
            if req.lora_name not in self.policy.adapters:
                raise HTTPError(404, f"adapter {req.lora_name!r} is not loaded", "not_found_error")
            self.policy.unload_adapter(req.lora_name)
            self.versions.pop(req.lora_name, None)

        await self.submit("call", SERIAL, unload)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."


def adapter_version(name: str, path: str) -> str:
    """`name@` the first 12 hex digits of the sha256 of the adapter's weight files: a name
    swapped in place to new weights is a new version in the traces it answers."""
    digest = hashlib.sha256()
    for f in sorted(Path(path).glob("adapter_model.*")):
        digest.update(f.read_bytes())
    return f"{name}@{digest.hexdigest()[:12]}"
