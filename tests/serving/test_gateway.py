"""The gateway (`selfevolve serve model=URL`, issue 42) in front of a real engine over real HTTP:
here the engine is another `selfevolve serve` process (the `vllm` tier runs it in front of
`vllm serve`). Requests pass through unchanged, every answer is a trace with the tokens the
engine sampled, streaming is relayed, adapters are forwarded, refinement runs through it."""

import httpx
import openai
import pytest

from selfevolve.data.store import TraceStore
from selfevolve.serving.process import ServerProcess

Q = [{"role": "user", "content": "What is 7 + 8 - 3 + 4?"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gateway")
    engine = ServerProcess(f"traces={d / 'engine.sqlite'}", "log_traces=false")
    try:
        gateway = ServerProcess(f"model={engine.url}/v1", f"traces={d / 'gateway.sqlite'}", "verifier=numeric")
    except Exception:
        engine.stop()
        raise
    gateway.traces = d / "gateway.sqlite"
    yield engine, gateway
    gateway.stop()
    engine.stop()


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)


def _moved_learner(seed: int, std: float):
    """A LoRA learner on tiny whose adapter answers unlike the base model."""
    import torch

    from selfevolve.training.learner import trainable_model

    torch.manual_seed(seed)
    learner = trainable_model("tiny", r=4, alpha=8)
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return learner


def test_answers_pass_through_and_are_logged_with_the_engines_tokens(pair):
    engine, gateway = pair
    direct = _client(engine).chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=24,
                                                     logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    via = _client(gateway).chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=24,
                                                   extra_body={"reference": "16"})
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.choices[0].logprobs is None  # added for the trace, not asked for: taken out again
    store = TraceStore(gateway.traces)
    trace = store.get(via.model_extra["selfevolve"]["trace_id"])
    store.close()
    ids = [int(t.token.removeprefix("token_id:")) for t in direct.choices[0].logprobs.content]
    assert trace.turns[0].token_ids == ids and trace.task.reference == "16"
    assert trace.turns[0].feedback.source == "verifier" and trace.policy_version is None  # the base model
    text = _client(gateway).completions.create(model="tiny", prompt="7 + 8 =", max_tokens=4, temperature=0)
    assert text.choices[0].text == _client(engine).completions.create(model="tiny", prompt="7 + 8 =", max_tokens=4,
                                                                      temperature=0).choices[0].text
    assert text.model_extra["selfevolve"]["trace_id"]


def test_streaming_is_relayed_and_the_trace_id_comes_last(pair):
    _, gateway = pair
    chunks = list(_client(gateway).chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=24,
                                                           stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].model_extra["selfevolve"]["trace_id"]
    store = TraceStore(gateway.traces)
    assert store.get(chunks[-1].model_extra["selfevolve"]["trace_id"]).final == text.strip()
    ask = dict(model="tiny+refine", messages=Q, temperature=0, max_tokens=16, extra_body={"refine": {"max_turns": 2}})
    whole = _client(gateway).chat.completions.create(**ask)
    refined = [c for c in _client(gateway).chat.completions.create(**ask, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in refined) == whole.choices[0].message.content
    logged = store.get(refined[-1].model_extra["selfevolve"]["trace_id"])  # a refinement through the engine, as SSE
    assert logged.final == whole.choices[0].message.content and len(logged.turns) >= 1
    store.close()


def test_engine_errors_come_back_as_the_engine_said_them(pair):
    _, gateway = pair
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(gateway).chat.completions.create(model="nope", messages=Q, max_tokens=4)
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"messages": Q})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]


def test_adapters_are_forwarded_and_traces_name_their_version(pair, tmp_path):
    from selfevolve.serving.server import adapter_version

    engine, gateway = pair
    _moved_learner(0, 0.3).save_pretrained(tmp_path / "v1")
    r = httpx.post(gateway.url + "/v1/load_lora_adapter", json={"lora_name": "evolved",
                                                                 "lora_path": str(tmp_path / "v1")})
    assert r.status_code == 200, r.text
    assert "evolved" in {m.id for m in _client(engine).models.list().data}  # loaded on the engine
    out = _client(gateway).chat.completions.create(model="evolved", messages=Q, temperature=0, max_tokens=16)
    store = TraceStore(gateway.traces)
    assert store.get(out.model_extra["selfevolve"]["trace_id"]).policy_version == adapter_version(
        "evolved", str(tmp_path / "v1"))
    store.close()
    refined = _client(gateway).chat.completions.create(model="evolved+refine", messages=Q, temperature=0,
                                                       max_tokens=16, extra_body={"refine": {"max_turns": 2}})
    assert refined.model_extra["selfevolve"]["turns"] >= 1  # the selfevolve loop, through the engine
    bad = httpx.post(gateway.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert bad.status_code == 400 and "engine refused" in bad.json()["error"]["message"]
    assert httpx.post(gateway.url + "/v1/unload_lora_adapter", json={"lora_name": "evolved"}).status_code == 200
    assert "evolved" not in {m.id for m in _client(engine).models.list().data}


def test_verified_sync_and_the_bodies_real_clients_send_through_the_gateway(pair, tmp_path):
    """An update loaded and canary-verified through the gateway (what every recipe and evolve
    do; the canary's echoed prompt is not logged as an answer); content parts, several
    prompts and legacy `logprobs=0` pass through and are logged per prompt."""
    from transformers import AutoTokenizer

    from selfevolve.policies import OpenAIPolicy
    from selfevolve.training.publish import save_update
    from tests.conftest import tiny_path

    engine, gateway = pair
    store = TraceStore(gateway.traces)
    before = store.count()
    update = save_update(_moved_learner(1, 0.1), AutoTokenizer.from_pretrained(tiny_path()), tmp_path / "u1")
    policy = update.serve(OpenAIPolicy(gateway.url), "u1")  # raises SyncError unless the engine serves it
    assert policy.served_names["u1"] in {m.id for m in _client(engine).models.list().data}
    assert store.count() == before  # the canary queries were not logged as traffic
    policy.unload_adapter("u1")

    c = _client(gateway)
    parts = c.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}])
    assert store.get(parts.model_extra["selfevolve"]["trace_id"]).task.prompt == "What is 2 + 2?"
    two = c.completions.create(model="tiny", prompt=["1 + 1 =", "2 + 2 ="], n=2, max_tokens=4, temperature=1.0,
                               seed=0, logprobs=0)
    assert len(two.choices) == 4 and all(ch.logprobs and ch.logprobs.token_logprobs for ch in two.choices)
    logged = [store.get(i) for i in two.model_extra["selfevolve"]["trace_ids"]]
    assert [t.task.prompt for t in logged] == ["1 + 1 =", "1 + 1 =", "2 + 2 =", "2 + 2 ="]
    assert [t.final for t in logged] == [ch.text.strip() for ch in two.choices]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.chat.completions.create(model="tiny", messages=Q, max_tokens=100_000)
    store.close()
