"""`selfevolve serve` over real HTTP on loopback, through the real `openai` client: chat,
completions, self-refinement, adapters with the verified-sync canary, bad requests."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from selfevolve.server_process import ServerProcess
from selfevolve.store import TraceStore

KEY = "test-key"
Q = [{"role": "user", "content": "What is 7 + 8 - 3 + 4?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    traces = tmp_path_factory.mktemp("serve") / "traces.sqlite"
    s = ServerProcess(f"api_key={KEY}", f"traces={traces}", "verifier=numeric")
    s.traces = traces
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models_chat_and_completions(client, tiny):
    assert {"tiny", "tiny+refine"} <= {m.id for m in client.models.list().data}
    r = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=40)
    # the server answers exactly what the in-process policy answers
    local = tiny.generate([Q], __import__("selfevolve").SamplingParams(max_new_tokens=40))[0][0]
    assert r.choices[0].message.content == local.response
    assert r.usage.completion_tokens == len(local.token_ids) and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=Q, temperature=1.0, n=3, seed=1, max_tokens=40)
    assert len(r.choices) == 3
    c = client.completions.create(model="tiny", prompt="What is 2 + 3?", max_tokens=8, temperature=0)
    assert c.choices[0].text and c.usage.prompt_tokens > 0


def test_echoed_logprobs_are_the_canary(client, tiny):
    from selfevolve.sync import CANARY
    r = client.completions.create(model="tiny", prompt=CANARY, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lps = r.choices[0].logprobs.token_logprobs[: r.usage.prompt_tokens]
    assert lps[0] is None
    assert sum(lps[1:]) == pytest.approx(tiny.prompt_logprob(CANARY), abs=1e-4)


def test_refinement_by_model_name_and_by_extra_field_is_stored(client, server):
    r = client.chat.completions.create(model="tiny+refine", messages=Q, temperature=0, max_tokens=40)
    meta = r.model_extra["selfevolve"]
    assert meta["turns"] == 3 and r.choices[0].message.content
    r2 = client.chat.completions.create(
        model="tiny",
        messages=Q,
        temperature=0,
        max_tokens=40,
        extra_body={"refine": {"critic": "verifier", "reference": "16", "max_turns": 3}},
    )
    meta2 = r2.model_extra["selfevolve"]
    store = TraceStore(server.traces)
    trace = store.get(meta2["trace_id"])
    assert trace is not None and store.get(meta["trace_id"]) is not None
    assert trace.final == r2.choices[0].message.content
    assert [t.score for t in trace.turns] == meta2["scores"]
    for t in trace.turns[:-1]:  # every critique came from the verifier and never gave the answer away
        assert t.critique.source == "verifier" and ("16" not in t.critique.text or t.score == 1.0)


def test_concurrent_clients_all_answered(client):
    def ask(i):
        return (client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                        "content": f"What is {i % 9 + 1} + 3?"}],
                                               temperature=0, max_tokens=24) .choices[0] .message.content)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(ask, range(48)))
    assert all(answers)
    assert answers[0] == answers[9]  # the same question gets the same greedy answer inside a batch


@pytest.mark.parametrize(
    "body,status,words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "tiny"}', 400, "messages"),
        (b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', 400, "limit"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 1000}', 400, "limit"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": true}', 400, "stream"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "does not exist"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "refine": {"max_turns": 99}}',
            400,
            "max_turns",
        ),
    ],
)
def test_malformed_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, client, body, status, words):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {KEY}",
                                                                               "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert client.chat.completions.create(model="tiny", messages=Q, max_tokens=4).choices


def test_oversized_and_unauthorised_requests(server):
    huge = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 2_000_000 + b'"}]}'
    r = httpx.post(server.url + "/v1/chat/completions", content=huge, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    long_prompt = {"model": "tiny", "messages": [{"role": "user", "content": "1 + " * 400}], "max_tokens": 4}
    r = httpx.post(server.url + "/v1/chat/completions", json=long_prompt, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    assert server.alive()


def test_adapter_round_trip_with_the_canary(server, tmp_path, tiny):
    """Train-side learner -> /v1/load_lora_adapter -> served answers and canary match the
    learner; a stale adapter is caught; unload returns to the base model."""
    import torch

    from selfevolve.policies import OpenAIPolicy
    from selfevolve.sync import CANARY, SyncError, publish, text_logprob, verify_sync
    from selfevolve.training import trainable_model

    policy = OpenAIPolicy(server.url, api_key=KEY)
    base_lp = policy.prompt_logprob(CANARY)
    learner = trainable_model("tiny", r=4, alpha=8)
    tok = tiny.tokenizer
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    publish(policy, learner, tok, tmp_path / "a1", "a1")  # raises SyncError on disagreement
    assert policy.active_adapter == "a1"
    assert "a1" in {m.id for m in policy.client.models.list().data}
    served = policy.prompt_logprob(CANARY)
    assert served == pytest.approx(text_logprob(learner, tok), rel=1e-4) and abs(served - base_lp) > 1e-3

    with torch.no_grad():  # the learner moves on; the server still has the old version
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    with pytest.raises(SyncError, match="canary"):
        verify_sync(policy, "a1", text_logprob(learner, tok))
    publish(policy, learner, tok, tmp_path / "a1v2", "a1")  # a new version under the same name
    policy.unload_adapter("a1")
    assert policy.active_adapter is None and policy.prompt_logprob(CANARY) == pytest.approx(base_lp, abs=1e-4)
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not a peft adapter" in r.json()["error"]["message"]
