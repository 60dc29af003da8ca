"""Serving: `selfevolve serve`, an OpenAI-compatible HTTP server over a policy.

`app` builds the FastAPI app (its routes, the model thread, request logging to the trace
store); `wire` is the request format it accepts; `access` who may reach it and what they may
touch; `fair_queue` how the model thread picks its next batch; `streaming` answers sent as
server-sent events; `gateway` the same server in front of another engine (vllm serve);
`process` starts and stops a server as a subprocess; `client` asks a server for a verdict.

May import: everything below it (core, data, training, the agent, evaluation, build and
run). Only the commands (evolve, the CLI) import it (tests/test_layers.py)."""
