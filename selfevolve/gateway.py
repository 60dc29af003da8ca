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

import json
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from .data import request_task
from .policies.openai import OpenAIPolicy, client_key, turn_from
from .serve import REFINE_SUFFIX, HTTPError, ServeConfig, Server, adapter_version
from .types import Turn
from .wire import ChatRequest, LoadAdapter

OURS = ("reference", "tests", "entry_point", "refine")  # selfevolve's request fields: never sent to the engine


class Gateway(Server):
    """`Server`'s routes, auth, trace store, feedback and refinement, over an engine reached by
    HTTP instead of a model in this process."""

    gateway = True

    def __init__(self, cfg: ServeConfig):
        super().__init__(cfg, OpenAIPolicy(cfg.model, max_retries=0))
        self.http = httpx.AsyncClient(base_url=self.policy.url, timeout=None,
                                      headers={"Authorization": f"Bearer {client_key()}"})

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
            return await self.chat(self.validated(ChatRequest, data))
        if not isinstance(data.get("model"), str):
            raise HTTPError(400, "model: a string is required")
        body = {k: v for k, v in data.items() if k not in OURS}
        asked = data.get("logprobs") not in (None, False)
        if not asked:  # what the trace needs; taken out of the answer below
            body |= {"logprobs": True, "return_tokens_as_token_ids": True} if chat else \
                {"logprobs": 0, "return_tokens_as_token_ids": True}
        task = request_task(data["messages"] if chat else data.get("prompt", ""), _Fields(data))
        version = self.versions.get(data["model"], None if data["model"] == self.name else data["model"])
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
            ids = await self.log("chat" if chat else "completion", [task], [turns], [version])
            if ids:
                out["selfevolve"] = {"trace_id": ids[0], "trace_ids": ids}
            return out
        r = await self.http.send(request, stream=True)
        if r.status_code >= 400:
            await r.aread()
            await r.aclose()
            return JSONResponse(_error_body(r), status_code=r.status_code)
        return StreamingResponse(self.relay(r, chat, asked, task, version), media_type="text/event-stream")

    async def relay(self, r: httpx.Response, chat: bool, asked: bool, task, version):
        """Pass the engine's events on as they arrive, gathering each choice's text and
        sampled tokens; after the engine's last event, one more chunk names the traces."""
        parts: dict[int, dict[str, Any]] = {}
        head: dict = {}
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
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
        turns = [_turn_of(p["text"], p["content"], p["finish_reason"]) for _, p in sorted(parts.items())]
        ids = await self.log("chat" if chat else "completion", [task], [turns], [version])
        if ids:
            last = head | {"choices": [], "selfevolve": {"trace_id": ids[0], "trace_ids": ids}}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    async def load_adapter(self, req: LoadAdapter) -> str:
        self.check_adapter_updates()
        path = self.adapter_path(req.lora_path or "")
        r = await self.http.post("/load_lora_adapter", json={**req.model_dump(exclude_none=True), "lora_path": path})
        if r.status_code >= 400:
            raise HTTPError(r.status_code, f"the engine refused the load: {r.text[:300]}")
        self.versions[req.lora_name] = adapter_version(req.lora_name, path)
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
    try:
        body = r.json()
        return body if isinstance(body, dict) and "error" in body else {"error": {"message": str(body)[:500]}}
    except ValueError:
        return {"error": {"message": r.text[:500], "code": r.status_code}}


def _lp_content(logprobs: dict | None, chat: bool) -> list[dict]:
    """A choice's sampled tokens and their log-probs as [{"token", "logprob"}], chat or legacy."""
    if not logprobs:
        return []
    if chat:
        return [{"token": t["token"], "logprob": t["logprob"]} for t in logprobs.get("content") or []]
    return [{"token": t, "logprob": lp} for t, lp in zip(logprobs.get("tokens") or [],
                                                         logprobs.get("token_logprobs") or [])]


def _turn(choice: dict, chat: bool) -> Turn:
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    return _turn_of(text or "", _lp_content(choice.get("logprobs"), chat), choice.get("finish_reason"))


def _turn_of(text: str, content: list[dict], finish: str | None) -> Turn:
    return turn_from(text, [c["token"] for c in content] or None, [c["logprob"] for c in content] or None, finish)

