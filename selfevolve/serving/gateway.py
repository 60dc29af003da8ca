"""`selfevolve serve model=http://HOST:PORT/v1`: the gateway in front of the engine users serve
with (`vllm serve`, SGLang, another `selfevolve serve`).

    vllm serve MODEL --enable-lora --max-lora-rank 16        # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
    selfevolve serve model=http://127.0.0.1:8001/v1 port=8000
    selfevolve evolve model=http://127.0.0.1:8000/v1 traces=runs/serve/traces.sqlite

Chat and completions requests go to the engine as they came, with every field the gateway
does not know (the engine's own sampling options) passed through and a streamed answer passed
on chunk by chunk as the engine sends it. The gateway only adds what a trace needs and the
client did not ask for — the sampled tokens' log-probabilities, as token ids where the engine
gives them (vLLM's `return_tokens_as_token_ids`) — and takes it out of the answer again.
Every answer is logged as a trace (scored where the request carried a `reference` or
`tests`, which are not forwarded), with the version that answered (`name@weights digest` for
an adapter loaded through the gateway); the answer's `selfevolve` field names it (on the last
chunk when streamed), and `/v1/feedback` attaches a verdict. A refinement request (model
`NAME+refine`, or a `refine` object) runs the selfevolve loop with the engine as the policy.
Adapter loads and unloads are forwarded to the engine; what the engine refuses comes back as
it said it. Auth, limits and the adapter root are `selfevolve serve`'s.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from selfevolve.data.sources import request_task
from selfevolve.policies.openai import OpenAIPolicy, client_key, turn_from
from selfevolve.serving.server import REFINE_SUFFIX, HTTPError, ServeConfig, Server, adapter_version
from selfevolve.serving.streaming import stream
from selfevolve.serving.wire import ChatRequest, LoadAdapter
from selfevolve.types import Turn

OURS = ("reference", "tests", "entry_point", "refine")  # selfevolve's request fields: never sent to the engine


class Gateway(Server):
    """`Server`'s auth, limits, trace store, feedback and refinement, over an engine reached by
    HTTP instead of a model in this process (the routes are app.py's, as for `Server`)."""

    gateway = True

    def __init__(self, cfg: ServeConfig):
        super().__init__(cfg, OpenAIPolicy(cfg.model, max_retries=0))
        self.http = httpx.AsyncClient(base_url=self.policy.url, headers={"Authorization": f"Bearer {client_key()}"},
                                      timeout=httpx.Timeout(None, connect=30.0),  # a long generation is not a hang
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def engine_policy(self, policy):  # an OpenAIPolicy: not a types.Servable, and it need not be
        return policy

    def identity(self) -> tuple[str, str]:
        name = self.cfg.name or self.policy.base_model
        return name, self.policy.root or name

    def count_prompt(self, conv) -> int:
        return 0  # the engine counts and limits prompts

    async def models_list(self) -> list[dict]:
        r = await self.http.get("/models")
        engine = r.json()["data"] if r.status_code == 200 else []
        return engine + [{"id": self.name + REFINE_SUFFIX, "object": "model", "owned_by": "selfevolve",
                          "root": self.root}]

    async def forward(self, data: dict, route: str):
        """One chat ("chat/completions") or completions request through the engine, logged."""
        chat = route == "chat/completions"
        if chat and (data.get("refine") or str(data.get("model", "")).endswith(REFINE_SUFFIX)):
            req = self.validated(ChatRequest, data)
            return await (stream(self.chat, req, None, chat=True) if req.stream else self.chat(req))
        if not isinstance(data.get("model"), str):
            raise HTTPError(400, "model: a string is required")
        self.check_limits(data)
        body = {k: v for k, v in data.items() if k not in OURS}
        asked = data.get("logprobs") is not None and data.get("logprobs") is not False  # 0 asks too (legacy)
        tasks = self.tasks_of(data, chat)
        if not asked and tasks:  # what the trace needs; taken out of the answer below
            body |= {"logprobs": True, "return_tokens_as_token_ids": True} if chat else \
                {"logprobs": 0, "return_tokens_as_token_ids": True}
        version = await self.version_of(data["model"])
        request = self.http.build_request("POST", "/" + route, json=body)
        if not data.get("stream"):
            r = await self.http.send(request)
            if r.status_code >= 400:
                return JSONResponse(_error_body(r), status_code=r.status_code)
            out = r.json()
            turns = [_turn(c, chat) for c in out["choices"]]
            for c in out["choices"]:
                if not asked:
                    c["logprobs"] = None
            ids = await self.log_choices(chat, tasks, turns, [c.get("index", i) for i, c in enumerate(out["choices"])],
                                         data.get("n") or 1, version)
            if ids:
                out["selfevolve"] = {"trace_id": ids[0], "trace_ids": ids}
            return out
        r = await self.http.send(request, stream=True)
        if r.status_code >= 400:
            await r.aread()
            await r.aclose()
            return JSONResponse(_error_body(r), status_code=r.status_code)
        return StreamingResponse(self.relay(r, chat, asked, tasks, data.get("n") or 1, version),
                                 media_type="text/event-stream")

    def check_limits(self, data: dict) -> None:
        """This server's limits on what one request may ask for (`max_tokens_limit`, `max_n`)."""
        tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        if isinstance(tokens, int) and tokens > self.cfg.max_tokens_limit:
            raise HTTPError(400, f"max_tokens={tokens} exceeds this server's limit of {self.cfg.max_tokens_limit}")
        if isinstance(data.get("n"), int) and data["n"] > self.cfg.max_n:
            raise HTTPError(400, f"n={data['n']} exceeds this server's limit of {self.cfg.max_n}")

    def tasks_of(self, data: dict, chat: bool) -> list:
        """The tasks a request poses (one per prompt), or [] where there is nothing to log: an
        echo (a log-prob query such as verified sync's canary, not an answer), token-id
        prompts, or a body the engine may take but this server cannot read as text."""
        fields = _Fields(data)
        try:
            if chat:
                return [request_task([m.model_dump() for m in self.validated(ChatRequest, data).messages], fields)]
            prompt = data.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if data.get("echo") or not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
                return []
            return [request_task(p, fields) for p in prompts]
        except (HTTPError, ValidationError):  # the engine decides whether it is a valid request
            return []

    async def version_of(self, model: str) -> str | None:
        """The version a request for `model` is answered by: None for the base model, the
        weights' digest for an adapter (loaded through the gateway, or found on the engine with
        a local `root`), else the name."""
        if model == self.name:
            return None
        if model not in self.versions:
            r = await self.http.get("/models")
            root = next((m.get("root") for m in (r.json().get("data", []) if r.status_code == 200 else [])
                         if m.get("id") == model), None)
            local = root and Path(root).is_dir()
            self.versions[model] = await asyncio.to_thread(adapter_version, model, root) if local else model
        return self.versions[model]

    async def log_choices(self, chat: bool, tasks: list, turns: list[Turn], index: list[int], n: int,
                          version: str | None) -> list[str]:
        """Log each choice under its prompt's task (choice i answers prompt i // n)."""
        if not tasks:
            return []
        answers: list[list[Turn]] = [[] for _ in tasks]
        for i, turn in zip(index, turns):
            answers[min(i // n, len(tasks) - 1)].append(turn)
        return await self.log("chat" if chat else "completion", tasks, answers, [version] * len(tasks))

    async def relay(self, r: httpx.Response, chat: bool, asked: bool, tasks: list, n: int, version):
        """Pass the engine's events on as they arrive, gathering each choice's text and
        sampled tokens; after the engine's last event, one more chunk names the traces. A
        stream that breaks off (an error event, a choice that never finished) is not logged."""
        parts: dict[int, dict[str, Any]] = {}
        head: dict = {}
        broken = False
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                broken |= "error" in chunk or chunk.get("object") == "error"
                head = {k: chunk[k] for k in ("id", "created", "model", "object") if k in chunk}
                for c in chunk.get("choices", []):
                    p = parts.setdefault(c["index"], {"text": "", "content": [], "finish_reason": None})
                    p["text"] += (c.get("delta", {}).get("content") or "") if chat else (c.get("text") or "")
                    p["content"] += _lp_content(c.get("logprobs"), chat)
                    p["finish_reason"] = c.get("finish_reason") or p["finish_reason"]
                    if not asked:
                        c["logprobs"] = None
                yield f"data: {json.dumps(chunk)}\n\n"
        finally:
            await r.aclose()
        if broken or not parts or any(p["finish_reason"] is None for p in parts.values()):
            yield "data: [DONE]\n\n"
            return
        index = sorted(parts)
        turns = [_turn_of(parts[i]["text"], parts[i]["content"], parts[i]["finish_reason"]) for i in index]
        ids = await self.log_choices(chat, tasks, turns, index, n, version)
        if ids:
            last = head | {"choices": [], "selfevolve": {"trace_id": ids[0], "trace_ids": ids}}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    async def load_adapter(self, req: LoadAdapter) -> str:
        self.check_adapter_updates()
        if not req.lora_path:
            raise HTTPError(400, "lora_path is required")
        if req.lora_name in (self.name, self.name + REFINE_SUFFIX) or req.lora_name.endswith(REFINE_SUFFIX):
            raise HTTPError(400, f"lora_name {req.lora_name!r} is the base model's name or asks for refinement")
        path = self.adapter_path(req.lora_path)
        r = await self.http.post("/load_lora_adapter", json={**req.model_dump(exclude_none=True), "lora_path": path})
        if r.status_code >= 400:
            raise HTTPError(r.status_code, f"the engine refused the load: {r.text[:300]}")
        self.versions[req.lora_name] = await asyncio.to_thread(adapter_version, req.lora_name, path)
        self.policy.adapters[req.lora_name] = path  # a refinement request may ask for it
        self.policy.served_names[req.lora_name] = req.lora_name
        return r.text

    async def unload_adapter(self, req: LoadAdapter) -> str:
        self.check_adapter_updates()
        r = await self.http.post("/unload_lora_adapter", json={"lora_name": req.lora_name})
        if r.status_code >= 400:
            raise HTTPError(r.status_code, f"the engine refused the unload: {r.text[:300]}")
        self.versions.pop(req.lora_name, None)
        self.policy.adapters.pop(req.lora_name, None)
        self.policy.served_names.pop(req.lora_name, None)
        return r.text


class _Fields:
    """The selfevolve fields of a raw request body, as `request_task` reads them."""

    def __init__(self, data: dict):
        self.reference, self.tests, self.entry_point = (data.get(k) for k in ("reference", "tests", "entry_point"))


def _error_body(r: httpx.Response) -> dict:
    """The engine's error as OpenAI's shape (older vLLM answers {"object": "error", "message": ...})."""
    try:
        body = r.json()
    except ValueError:
        return {"error": {"message": r.text[:500], "code": r.status_code}}
    if isinstance(body, dict) and "error" in body:
        return body
    message = body.get("message") if isinstance(body, dict) else None
    return {"error": {"message": str(message or body)[:500], "code": r.status_code}}


def _lp_content(logprobs: dict | None, chat: bool) -> list[dict]:
    """A choice's sampled tokens and their log-probs as [{"token", "logprob"}], chat or legacy."""
    if not logprobs:
        return []
    if chat:
        return [{"token": t["token"], "logprob": t["logprob"]} for t in logprobs.get("content") or []]
    return [{"token": t, "logprob": lp} for t, lp in zip(logprobs.get("tokens") or [],
                                                         logprobs.get("token_logprobs") or []) if lp is not None]


def _turn(choice: dict, chat: bool) -> Turn:
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    return _turn_of(text or "", _lp_content(choice.get("logprobs"), chat), choice.get("finish_reason"))


def _turn_of(text: str, content: list[dict], finish: str | None) -> Turn:
    return turn_from(text, [c["token"] for c in content] or None, [c["logprob"] for c in content] or None, finish)

