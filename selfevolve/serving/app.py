"""`selfevolve serve`: an OpenAI-compatible HTTP server over a selfevolve policy.

    selfevolve serve model=tiny port=8000 [api_key=...] [critic=self] [verifier=numeric]
    selfevolve serve model=http://127.0.0.1:8001/v1 port=8000   # in front of vllm serve: selfevolve/serving/gateway.py

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter (vLLM's runtime-LoRA shapes, so
`OpenAIPolicy` drives vLLM and this server the same way); `stream=true`: selfevolve/serving/streaming.py.

Self-refinement: a chat request whose `model` ends in "+refine" (e.g. "tiny+refine"), or that
carries an extra `refine` object ({"max_turns": 3, "critic": "self", "reference": "42"}),
runs the selfevolve loop; the final answer is the message, and the response's `selfevolve`
field holds the trace id, the turns' scores and critiques. Every refinement trace is stored.

Concurrent requests are batched on one model-owning thread (selfevolve/serving/server.py).
This module is the HTTP layer: `create_app` (routes, auth, body size, Origin and Content-Type
checks, OpenAI-style error bodies: a bad request gets a 4xx and the server keeps serving) and
`serve` (binds the socket, prints the banner).
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from selfevolve.errors import UserError
from selfevolve.serving.access import authorized, foreign_request
from selfevolve.serving.server import REFINE_SUFFIX, HTTPError, ServeConfig, Server
from selfevolve.serving.streaming import stream
from selfevolve.serving.wire import ChatRequest, CompletionRequest, FeedbackRequest, LoadAdapter


def create_app(server: Server):
    """The FastAPI app for a Server."""

    @asynccontextmanager
    async def lifespan(app):
        task = server.start()
        yield
        task.cancel()

    app = FastAPI(title="selfevolve", lifespan=lifespan)

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        return error(e.status, e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health" and not authorized(server.api_key, request.headers.get("authorization")):
            return error(401, "missing or wrong API key (send `Authorization: Bearer KEY`)", "authentication_error")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > server.cfg.max_request_bytes:
            return error(413, f"request body of {size} bytes exceeds the limit of {server.cfg.max_request_bytes}")
        if request.method == "POST" and (why := foreign_request(request, server.cfg.host)):
            return error(415 if why.startswith("Content-Type") else 403, why)
        try:
            return await call_next(request)
        except Exception as e:  # never let one request take the server down
            return error(500, f"internal error: {type(e).__name__}: {str(e)[:200]}", "server_error")

    async def body(request: Request, model: type[BaseModel] | None):
        raw = await request.body()
        if len(raw) > server.cfg.max_request_bytes:
            raise HTTPError(413, f"request body exceeds the limit of {server.cfg.max_request_bytes} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON ({e})")
        except RecursionError:
            raise HTTPError(400, "the body is nested too deeply")
        if not isinstance(data, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return data if model is None else server.validated(model, data)

    @app.get("/health")
    async def health():
        """Needs no key. `waiting_sequences`: sequences queued for the model thread and not yet
        in a batch (what vLLM's /metrics calls num_requests_waiting, counted in sequences)."""
        return {"status": "ok", "waiting_sequences": server.queue.sequences() if server.queue else 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": await server.models_list()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if server.gateway:
            return await server.forward(await body(request, None), "chat/completions")
        req = await body(request, ChatRequest)
        if req.stream:
            return await stream(server.chat, req, server.policy.tokenizer, chat=True)
        return await server.chat(req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        if server.gateway:
            return await server.forward(await body(request, None), "completions")
        req = await body(request, CompletionRequest)
        if req.stream:
            return await stream(server.complete, req, server.policy.tokenizer, chat=False)
        return await server.complete(req)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        return await server.feedback(await body(request, FeedbackRequest))

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        return PlainTextResponse(await server.load_adapter(await body(request, LoadAdapter)))

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        return PlainTextResponse(await server.unload_adapter(await body(request, LoadAdapter)))

    return app


def serve(cfg: ServeConfig, server: Server | None = None) -> None:
    """Bind first (a port in use is one line and exit 2, before any banner), then serve on
    that socket; port=0 takes a free port, and the banner names it."""
    import socket

    import uvicorn

    server = server or Server(cfg)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise UserError(f"port={cfg.port}: cannot listen on {cfg.host} ({e.strerror or e})") from None
    port = sock.getsockname()[1]
    print(
        f"selfevolve serve: {server.name} on http://{cfg.host}:{port}/v1 "
        f"(refinement: model={server.name}{REFINE_SUFFIX}; traces: {cfg.traces})",
        flush=True,
    )
    config = uvicorn.Config(create_app(server), host=cfg.host, port=port, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
