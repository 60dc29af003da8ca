"""Serving: `selfevolve serve`, an OpenAI-compatible HTTP server over a policy.

`app` builds the FastAPI app (its routes, errors and body limits) over a `server.Server`
(the model thread, batching, refinement, request logging to the trace store, adapters);
`wire` is the request format it accepts; `access` who may reach it and what they may
touch; `fair_queue` how the model thread picks its next batch; `streaming` answers sent as
server-sent events; `gateway` the same server in front of another engine (vllm serve);
`process` starts and stops a server as a subprocess; `client` sends a user's verdict on a
logged answer (POST /v1/feedback).

May import: everything below it (core, data, training, the agent, evaluation, build and
run). Only the commands import it: the CLI, the LangChain Runnable and the package's
exports (tests/test_layers.py)."""
