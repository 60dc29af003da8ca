"""`selfevolve serve` over real HTTP on loopback, through the real `openai` client: chat,
completions, self-refinement, adapters with the verified-sync canary, bad requests."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from selfevolve.data.store import TraceStore
from selfevolve.serving.process import ServerProcess

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
    from selfevolve.training.publish import CANARY
    r = client.completions.create(model="tiny", prompt=CANARY, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lps = r.choices[0].logprobs.token_logprobs[: r.usage.prompt_tokens]
    assert lps[0] is None
    assert sum(lps[1:]) == pytest.approx(sum(tiny.prompt_logprobs(CANARY)), abs=1e-4)


def test_token_id_prompts_and_exact_text(client, tiny):
    """Prompts as token ids (a list, or a list of lists: what lm-eval's local-completions
    sends) are answered as the same text is; the text returned is its tokens decoded, and the
    tokens' offsets index that text."""
    tok = tiny.tokenizer
    text = "What is 2 + 3?"
    ids = tok(text)["input_ids"]
    by_text = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0, logprobs=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    two = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=12, temperature=0)
    answer = by_text.choices[0]
    assert by_ids.choices[0].text == answer.text and [c.text for c in two.choices] == [answer.text] * 2
    assert answer.text == "".join(answer.logprobs.tokens)  # exactly the tokens: no space trimmed
    offsets = answer.logprobs.text_offset
    assert offsets[0] == 0 and all(answer.text[a:].startswith(t) for a, t in zip(offsets, answer.logprobs.tokens))
    word = answer.text.split()[1]  # cut at `stop` on the exact text: what comes before is kept, spaces too
    cut = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].text == answer.text[: answer.text.index(word)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=text, max_tokens=12, temperature=0, stop=[word], stream=True))
    assert streamed == cut.choices[0].text
    with pytest.raises(openai.BadRequestError, match="token ids must be in"):
        client.completions.create(model="tiny", prompt=[len(tok) + 5], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens=0 returns nothing without echo"):
        client.completions.create(model="tiny", prompt=text, max_tokens=0)


def test_loglikelihood_as_lm_eval_asks_for_it(client, tiny):
    """Multiple choice the way lm-eval's local-completions scores it: context + continuation
    as token ids, echo=true, logprobs=1, max_tokens=0; the continuation's log-prob and
    whether it is greedy (each token's log-prob the top one's). Both equal a direct
    computation on the model, and so does the choice made."""
    import torch

    tok = tiny.tokenizer
    context = tok("What is 2 + 3? The answer is")["input_ids"]
    choices = [" 5.", " 6.", " 23."]
    scored = []
    for c in choices:
        cont = tok(c, add_special_tokens=False)["input_ids"]
        r = client.completions.create(model="tiny", prompt=context + cont, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == tok.decode(context + cont, skip_special_tokens=True)
        assert len(lp.token_logprobs) == len(context + cont) and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
        mine = sum(lp.token_logprobs[len(context):])
        greedy = all(x >= max(t.values()) - 1e-6 for x, t in zip(lp.token_logprobs[len(context):],
                                                                   lp.top_logprobs[len(context):]))
        with torch.no_grad():  # the direct computation
            ids = torch.tensor([context + cont])
            logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0, :-1].float(), -1)
            direct = logp[torch.arange(len(context) - 1, ids.shape[1] - 1), ids[0, len(context):]]
            direct_greedy = bool((logp[len(context) - 1:].argmax(-1) == ids[0, len(context):]).all())
        assert mine == pytest.approx(direct.sum().item(), abs=1e-4) and greedy == direct_greedy
        scored.append((mine, direct.sum().item()))
    assert max(range(3), key=lambda i: scored[i][0]) == max(range(3), key=lambda i: scored[i][1])


def test_top_logprobs_are_filled(client):
    """Chat's top_logprobs=k and completions' logprobs=k give the k most likely tokens at each
    step; greedy, the chosen token is the first of them."""
    r = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
               for c in content)
    c = client.completions.create(model="tiny", prompt="What is 2 + 3?", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(x, abs=1e-5)
               for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs=true"):
        client.chat.completions.create(model="tiny", messages=Q, max_tokens=2, top_logprobs=2)


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


def test_refinement_keeps_its_system_message_and_refuses_what_it_would_drop(client, server, tiny):
    """A system message reaches every attempt (the answer is what the policy gives with it)
    and the stored trace; earlier user messages or assistant turns are refused, not dropped."""
    from selfevolve.loop import refine_batch

    system = [{"role": "system", "content": "Answer with the number only."}]
    r = client.chat.completions.create(model="tiny+refine", messages=system + Q, temperature=0, max_tokens=40,
                                       extra_body={"refine": {"max_turns": 2}})
    local = refine_batch([Q[0]["content"]], tiny, max_turns=2, system=system[0]["content"],
                         sampling=__import__("selfevolve").SamplingParams(max_new_tokens=40))[0]
    assert r.choices[0].message.content == local.final
    stored = TraceStore(server.traces).get(r.model_extra["selfevolve"]["trace_id"])
    assert stored.task.meta["messages"][0] == system[0]
    with pytest.raises(openai.BadRequestError, match="one user message"):
        client.chat.completions.create(model="tiny+refine", messages=Q + Q, max_tokens=8)


def test_concurrent_clients_all_answered(client):
    def ask(i):
        return (client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                        "content": f"What is {i % 9 + 1} + 3?"}],
                                               temperature=0, max_tokens=24) .choices[0] .message.content)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(ask, range(48)))
    assert all(answers)
    assert answers[0] == answers[9]  # the same question gets the same greedy answer inside a batch


def test_requests_that_differ_only_in_seed_share_a_batch_and_keep_their_answers(client):
    """Issue 42: the seed is not part of the batch key; each request is sampled from its own
    seed, so its answer is the same alone as batched with 15 others."""
    from selfevolve.serving.server import BatchKey, unseeded
    from selfevolve.types import SamplingParams

    a, b = SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2)
    assert BatchKey("x", unseeded(a)) == BatchKey("x", unseeded(b))

    def ask(seed):
        return [c.message.content for c in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"What is {seed % 9 + 1} + 5 - 2?"}],
            temperature=1.0, seed=seed, n=2, max_tokens=32).choices]

    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(ask, range(16)))
    alone = [ask(seed) for seed in range(16)]
    assert batched == alone
    assert len({tuple(x) for x in alone}) > 1 and any(x[0] != x[1] for x in alone)  # seeds are not all one stream


@pytest.mark.parametrize(
    "body,status,words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "tiny"}', 400, "messages"),
        (b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', 400, "limit"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 1000}', 400, "limit"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400,
         "tools"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": '
         b'"json_object"}}', 400, "response_format"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "does not exist"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "refine": {"max_turns": 99}}',
            400,
            "max_turns",
        ),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}', 400,
         "seed"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "surrogate"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, 400, "nested"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "refine": {"critic": "judge"}}', 400,
         "judge="),
    ],
)
def test_malformed_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, client, body, status, words):
    """Each of these answered 500 before (issue 33): a 5xx is a bug report, not an answer."""
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {KEY}",
                                                                               "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert client.chat.completions.create(model="tiny", messages=Q, max_tokens=4).choices


def test_content_parts_and_greedy_n_as_real_clients_send_them(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 7 + 8"}, {"type": "text", "text": "?"}]}]
    joined = [{"role": "user", "content": "What is 7 + 8?"}]
    r = client.chat.completions.create(model="tiny", messages=parts, temperature=0, max_tokens=24, n=2)
    same = client.chat.completions.create(model="tiny", messages=joined, temperature=0, max_tokens=24)
    assert [c.message.content for c in r.choices] == [same.choices[0].message.content] * 2
    with pytest.raises(openai.BadRequestError, match="text content parts"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_empty_prompts_and_nul_paths_are_refused(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ""}, headers=auth)
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "x\u0000y"},
                   headers=auth)
    assert r.status_code == 400 and "NUL" in r.json()["error"]["message"]


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
    from selfevolve.training.learner import trainable_model
    from selfevolve.training.publish import CANARY, SyncError, canary_logprobs, publish, text_logprob, verify_sync

    policy = OpenAIPolicy(server.url, api_key=KEY)
    base_lp = sum(policy.prompt_logprobs(CANARY))
    torch.manual_seed(0)  # lora_A's initialisation too: the test's numbers must not depend on the tests before it
    learner = trainable_model("tiny", r=4, alpha=8)
    tok = tiny.tokenizer
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    publish(policy, learner, tok, tmp_path / "a1", "a1")  # raises SyncError on disagreement
    assert policy.active_adapter == "a1"
    assert policy.served_names["a1"] in {m.id for m in policy.client.models.list().data}
    served = sum(policy.prompt_logprobs(CANARY))
    assert served == pytest.approx(text_logprob(learner, tok), rel=1e-4) and abs(served - base_lp) > 1e-3

    with torch.no_grad():  # the learner moves on; the server still has the old version
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    with pytest.raises(SyncError, match="canary"):
        verify_sync(policy, "a1", canary_logprobs(learner, tok))
    publish(policy, learner, tok, tmp_path / "a1v2", "a1")  # a new version under the same name
    policy.unload_adapter("a1")
    assert policy.active_adapter is None and sum(policy.prompt_logprobs(CANARY)) == pytest.approx(base_lp, abs=1e-4)
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not a peft adapter" in r.json()["error"]["message"]


def _other_base_adapter(path):
    """A peft adapter trained for a different model (a narrower Llama): its shapes do not fit tiny."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=100, max_position_embeddings=64))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path


def test_a_failed_load_leaves_the_served_model_as_it_was(server, tmp_path):
    """Over HTTP: an adapter that does not fit, loaded as a new name and as a new version of
    a loaded one, is refused, and every served model scores the canary exactly as before."""
    import torch
    from safetensors.torch import load_file, save_file

    from selfevolve.policies import OpenAIPolicy
    from selfevolve.training.learner import trainable_model
    from selfevolve.training.publish import CANARY

    learner = trainable_model("tiny", r=4, alpha=8)
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    learner.save_pretrained(tmp_path / "good")
    policy = OpenAIPolicy(server.url, api_key=KEY)
    policy.load_adapter(str(tmp_path / "good"), "kept")

    def state():
        models = sorted(m.id for m in policy.client.models.list().data)
        scores = {}
        for name in (None, "kept"):
            policy.set_adapter(name)
            scores[name] = sum(policy.prompt_logprobs(CANARY))
        return models, scores

    before = state()
    # a new version whose last tensor has the wrong shape: the tensors before it would load
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    learner.save_pretrained(tmp_path / "half")
    weights = load_file(tmp_path / "half" / "adapter_model.safetensors")
    last = sorted(weights)[-1]
    weights[last] = weights[last][:, :2].contiguous()
    save_file(weights, tmp_path / "half" / "adapter_model.safetensors")
    other = str(_other_base_adapter(tmp_path / "other"))
    for name, path in (("new-name", other), ("kept", other), ("new-name", str(tmp_path / "half")),
                       ("kept", str(tmp_path / "half"))):
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path,
                                                                   "load_inplace": name == "kept"},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"], r.text
        assert state() == before, (name, path)
    policy.unload_adapter("kept")


def test_adapter_updates_are_gated_and_confined(tmp_path):
    """adapter_root confines lora_path and its errors say nothing about paths outside it;
    allow_adapter_updates=false refuses updates even on loopback."""
    root = tmp_path / "adapters"
    root.mkdir()
    with ServerProcess(f"adapter_root={root}", f"traces={tmp_path / 't.sqlite'}") as s:
        for outside in ("/etc", "../", str(tmp_path)):
            r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": outside})
            assert r.status_code == 403, r.text
            assert r.json()["error"]["message"] == "lora_path is outside this server's adapter_root"
        (root / "empty").mkdir()
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "empty"})
        assert r.status_code == 400 and "not a peft adapter" in r.json()["error"]["message"]
    with ServerProcess("allow_adapter_updates=false", f"traces={tmp_path / 't.sqlite'}") as s:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            r = httpx.post(s.url + path, json={"lora_name": "x", "lora_path": str(root)})
            assert r.status_code == 403 and "allow_adapter_updates=true" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 200


def test_every_answer_is_a_trace_and_feedback_attaches_to_it(client, server):
    """Plain chat (n answers: n traces, scored where a reference came in extra_body) and
    completions are logged; POST /v1/feedback sets a user's verdict, and bad feedback (an
    unknown id, a score outside [0, 1], a malformed body) is a 4xx that changes nothing."""
    store = TraceStore(server.traces)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}, *Q],
                                       temperature=1.0, n=2, seed=3, max_tokens=40, extra_body={"reference": "16"})
    ids = r.model_extra["selfevolve"]["trace_ids"]
    traces = [store.get(i) for i in ids]
    assert len(ids) == 2 and [t.final for t in traces] == [c.message.content for c in r.choices]
    assert all(t.task.reference == "16" and t.turns[0].feedback.source == "verifier" for t in traces)
    assert traces[0].task.id == traces[1].task.id and traces[0].task.meta["messages"][0]["role"] == "system"
    again = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": " Be brief."}, *Q],
                                           temperature=0, max_tokens=8)  # no reference this time: a verdict later
    later = store.get(again.model_extra["selfevolve"]["trace_id"])
    assert later.task.id == traces[0].task.id and later.task.reference is None  # one task, one side of any split
    from selfevolve.data.sources import logged_tasks

    task = next(t for t in logged_tasks(str(server.traces)) if t.id == later.task.id)
    assert task.reference == "16" and len(task.meta["logged"]) >= 3
    c = client.completions.create(model="tiny", prompt="What is 2 + 3?", max_tokens=8, temperature=0)
    plain = store.get(c.model_extra["selfevolve"]["trace_id"])
    assert plain.meta["kind"] == "completion" and plain.turns[0].score is None  # nothing to score it against

    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    ok = http.post("/v1/feedback", json={"trace_id": plain.id, "score": 1.0, "text": "right"})
    assert ok.status_code == 200 and ok.json()["trace_id"] == plain.id
    after = store.get(plain.id)
    assert after.turns[0].feedback.source == "user" and after.turns[0].score == 1.0
    assert store.count(min_score=1.0) >= 1 and after.meta["feedback"][0]["text"] == "right"
    verified = traces[0].turns[0].feedback
    http.post("/v1/feedback", json={"trace_id": ids[0], "score": 0.0})  # replaces the verifier's, kept in meta
    assert store.get(ids[0]).meta["replaced_feedback"]["score"] == verified.score
    before = store.get(plain.id).model_dump()
    for bad, status in (({"trace_id": "nope", "score": 1}, 404), ({"trace_id": plain.id, "score": 1.5}, 400),
                        ({"trace_id": plain.id, "score": "NaN"}, 400), ({"trace_id": plain.id}, 400),
                        ({"trace_id": plain.id, "score": 0.5, "extra": 1}, 400), ([1, 2], 400)):
        e = http.post("/v1/feedback", json=bad)
        assert e.status_code == status and "\n" not in e.json()["error"]["message"], (bad, e.text)
    assert http.post("/v1/feedback", content=b"{not json", headers={"Content-Type": "application/json"}
                     ).status_code == 400
    assert store.get(plain.id).model_dump() == before
    assert httpx.post(server.url + "/v1/feedback", json={"trace_id": plain.id, "score": 0}).status_code == 401


def test_no_web_page_can_post_to_the_server(server):
    """A browser's cross-site POST (text/plain or a form needs no CORS preflight), a foreign
    Origin, or a rebinding Host is refused before anything runs: a web page can neither
    change the model nor write the traces it will learn from."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = b'{"trace_id": "x", "score": 1}'
    for headers, status in (({"Content-Type": "text/plain"}, 415),
                            ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
                            ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
                            ({"Content-Type": "application/json", "Host": "evil.example"}, 403)):
        for path in ("/v1/feedback", "/v1/unload_lora_adapter", "/v1/chat/completions"):
            r = httpx.post(server.url + path, content=body, headers={**auth, **headers})
            assert r.status_code == status, (path, headers, r.text)
    same = httpx.post(server.url + "/v1/feedback", content=body, headers={
        **auth, "Content-Type": "application/json; charset=utf-8", "Origin": server.url})
    assert same.status_code == 404  # a same-origin JSON request gets through to the route


def test_feedback_from_python_and_from_a_langchain_chain(client, server):
    import selfevolve
    from selfevolve.errors import UserError
    from selfevolve.langchain import ServerFeedback

    r = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=24)
    trace_id = r.model_extra["selfevolve"]["trace_id"]
    url = server.url + "/v1"
    assert selfevolve.feedback_for(trace_id, 0.0, "wrong", base_url=url, api_key=KEY)["trace_id"] == trace_id
    assert ServerFeedback(url, api_key=KEY).invoke({"trace_id": trace_id, "score": 1.0})["score"] == 1.0
    stored = TraceStore(server.traces).get(trace_id)
    assert [f["score"] for f in stored.meta["feedback"]] == [0.0, 1.0] and stored.turns[-1].score == 1.0
    with pytest.raises(UserError, match="404"):
        selfevolve.feedback_for("unknown", 1.0, base_url=url, api_key=KEY)
    with pytest.raises(UserError, match="401"):
        selfevolve.feedback_for(trace_id, 1.0, base_url=url, api_key="wrong")


def test_a_port_in_use_is_one_line_and_exit_2(server):
    from tests.test_cli import cli

    r = cli("serve", "model=tiny", f"port={server.port}")
    assert r.returncode == 2 and "cannot listen" in r.stderr and "selfevolve serve:" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_adapter_names_that_ask_for_refinement_and_nan_adapters_are_refused(server, tmp_path, tiny):
    import torch

    from selfevolve.training.learner import trainable_model

    learner = trainable_model("tiny", r=4, alpha=8)
    with torch.no_grad():
        next(p for n, p in learner.named_parameters() if "lora_B" in n).fill_(float("nan"))
    learner.save_pretrained(tmp_path / "nan")
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x+refine", "lora_path": str(tmp_path)},
                   headers=auth)
    assert r.status_code == 400 and "refinement" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "nan", "lora_path": str(tmp_path / "nan")},
                   headers=auth, timeout=60)
    assert r.status_code == 400 and "not finite" in r.json()["error"]["message"]
    assert "nan" not in [m["id"] for m in httpx.get(server.url + "/v1/models", headers=auth).json()["data"]]


def test_in_place_swaps_under_32_concurrent_clients(server, client, tmp_path):
    """What evolve's promotion does (`load_inplace`, vLLM's): the name traffic asks for is
    replaced whole while 32 clients keep asking for it. No request fails, every answer is the
    old version's or the new one's (never a mix, never the base's) and its trace names that
    version, a version with another
    rank and alpha replaces the old config too, and a plain load under a used name is
    refused as vLLM refuses it."""
    import threading

    import torch

    from selfevolve.training.learner import trainable_model

    paths = []
    for i, (r, alpha) in enumerate(((4, 8), (8, 32))):
        torch.manual_seed(i)
        learner = trainable_model("tiny", r=r, alpha=alpha)
        with torch.no_grad():
            for n, p in learner.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        learner.save_pretrained(tmp_path / f"v{i}")
        paths.append(str(tmp_path / f"v{i}"))
    auth = {"Authorization": f"Bearer {KEY}"}

    def load(path, inplace=True):
        return httpx.post(server.url + "/v1/load_lora_adapter", headers=auth, timeout=120,
                          json={"lora_name": "live", "lora_path": path, "load_inplace": inplace})

    def greedy(model="live"):
        return client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=16,
                                              ).choices[0].message.content

    answers = {}
    for path in paths:
        assert load(path).status_code == 200
        answers[path] = greedy()
    assert len(set(answers.values()) | {greedy("tiny")}) == 3  # the two versions and the base differ
    assert load(paths[0], inplace=False).status_code == 400  # a used name, without load_inplace

    seen, errors, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                seen.append(greedy())
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                errors.append(repr(e))

    threads = [threading.Thread(target=hammer) for _ in range(32)]
    for t in threads:
        t.start()
    try:
        while len(seen) < 32 and not errors:  # every client is in flight before the first swap
            stop.wait(0.05)
        for k in range(8):
            assert load(paths[k % 2]).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and len(seen) >= 64
    assert set(seen) <= set(answers.values())
    assert greedy() == answers[paths[1]]  # the last version loaded, with its own rank and alpha
    # every trace names the version that answered it, not the name both versions were served under
    from selfevolve.serving.server import adapter_version

    store = TraceStore(server.traces)
    logged = [t for t in store.iter() if (t.policy_version or "").startswith("live@")]
    store.close()
    by_version = {adapter_version("live", p): answers[p] for p in paths}
    assert len(by_version) == 2 and len(logged) >= 64
    assert all(t.final == by_version[t.policy_version] for t in logged)
    r = httpx.post(server.url + "/v1/unload_lora_adapter", headers=auth, json={"lora_name": "live"})
    assert r.status_code == 200


def test_adapter_calls_keep_their_own_fate(server, client, tmp_path):
    """Issue 33: a bad load batched with a good one fails alone; a config peft cannot use is
    a 400; an unload racing a chat for the same adapter answers the chat 200 or 404, never
    500."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from selfevolve.training.learner import trainable_model

    good = tmp_path / "good"
    trainable_model("tiny", r=4, alpha=8).save_pretrained(good)
    other = str(_other_base_adapter(tmp_path / "other"))
    auth = {"Authorization": f"Bearer {KEY}"}

    def load(name, path):
        return httpx.post(server.url + "/v1/load_lora_adapter", headers=auth, timeout=60,
                          json={"lora_name": name, "lora_path": str(path)})

    with ThreadPoolExecutor(4) as pool:  # land in one worker batch
        bad1, ok, bad2 = pool.map(lambda a: load(*a), [("b1", other), ("fate-good", good), ("b2", other)])
    assert (bad1.status_code, ok.status_code, bad2.status_code) == (400, 200, 400), (bad1.text, ok.text)
    served = {m.id for m in client.models.list().data}
    assert "fate-good" in served and not {"b1", "b2"} & served

    for i, config in enumerate(["{not json", "[1, 2]", json.dumps({"peft_type": "LORA", "r": "abc"})]):
        broken = tmp_path / f"broken{i}"
        broken.mkdir()
        for f in good.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        (broken / "adapter_config.json").write_text(config)
        r = load(f"broken{i}", broken)
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"], r.text

    def chat():
        try:
            client.chat.completions.create(model="fate-good", messages=Q, temperature=0, max_tokens=8)
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    with ThreadPoolExecutor(8) as pool:
        chats = [pool.submit(chat) for _ in range(6)]
        unload = pool.submit(httpx.post, server.url + "/v1/unload_lora_adapter", headers=auth,
                             json={"lora_name": "fate-good"})
        again = pool.submit(httpx.post, server.url + "/v1/unload_lora_adapter", headers=auth,
                            json={"lora_name": "fate-good"})
        codes = {c.result() for c in chats}
    assert codes <= {200, 404}, codes
    assert sorted([unload.result().status_code, again.result().status_code]) == [200, 404]


def test_file_symlinks_out_of_the_adapter_root_are_refused(tmp_path):
    from selfevolve.training.learner import trainable_model

    outside, root = tmp_path / "outside", tmp_path / "root"
    trainable_model("tiny", r=4, alpha=8).save_pretrained(outside)
    (root / "linked").mkdir(parents=True)
    for f in outside.iterdir():
        (root / "linked" / f.name).symlink_to(f)
    with ServerProcess(f"adapter_root={root}", f"traces={tmp_path / 't.sqlite'}") as s:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "linked"})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["message"] == "lora_path is outside this server's adapter_root"


def test_streaming_and_stop_as_real_clients_send_them(client, server):
    """stream=true answers as server-sent events the openai client reads (chat and
    completions, the trace id on the first chunk); `stop` cuts the answer before the stop
    string, as OpenAI does, and the logged trace holds what the client got."""
    whole = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=24,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and chunks[-1].choices[0].finish_reason == "stop"
    assert [c.choices[0].delta.role for c in chunks if c.choices[0].delta.role] == ["assistant"]  # once, first
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].model_extra["selfevolve"]["trace_id"]
    refined = list(client.chat.completions.create(model="tiny+refine", messages=Q, temperature=0, max_tokens=24,
                                                  stream=True))
    assert refined[-1].model_extra["selfevolve"]["turns"] >= 1 and any(c.choices[0].delta.content for c in refined)
    parts = list(client.completions.create(model="tiny", prompt="What is 2 + 3?", max_tokens=8, temperature=0,
                                           stream=True))
    plain = client.completions.create(model="tiny", prompt="What is 2 + 3?", max_tokens=8, temperature=0)
    assert "".join(p.choices[0].text for p in parts) == plain.choices[0].text

    full = whole.choices[0].message.content
    word = full.split()[2]
    cut = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=24, stop=[word, "zzz"])
    assert cut.choices[0].message.content == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"
    logged = TraceStore(server.traces).get(cut.model_extra["selfevolve"]["trace_id"])
    assert logged.final == cut.choices[0].message.content and logged.turns[0].token_ids is None
    with pytest.raises(openai.BadRequestError, match="per-request limit"):  # prompts × n × max_tokens
        client.completions.create(model="tiny", prompt=["1+1="] * 64, n=16, max_tokens=512)
    text_ok = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=8,
                                             response_format={"type": "text"})
    assert text_ok.choices[0].message.content


def test_the_server_checks_its_policy_once_at_start(tmp_path, tiny):
    """types.Servable names everything serve calls: a policy without it is refused in one
    line at start (a LangChain chat model has no adapters, tokenizer or completions)."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from selfevolve.errors import UserError
    from selfevolve.policies import LangChainPolicy
    from selfevolve.serving.server import ServeConfig, Server
    from selfevolve.types import Servable

    assert isinstance(tiny, Servable)
    with pytest.raises(UserError, match="not a types.Servable"):
        Server(ServeConfig(traces=str(tmp_path / "t.sqlite")), LangChainPolicy(FakeListChatModel(responses=["x"])))


def test_a_large_request_does_not_hold_a_small_one(client, server):
    """Issue 33: a completions request of 64 prompts × n=16 (1024 sequences, 16 batches of
    `max_batch`) is answered in turns with the other clients' requests: a short chat sent once
    the first of its batches is generating returns while the rest are still queued."""
    import threading
    import time

    def waiting():
        return httpx.get(server.url + "/health").json()["waiting_sequences"]

    big = threading.Thread(target=lambda: client.completions.create(
        model="tiny", prompt=[f"What is {i % 9} + {i % 7}?" for i in range(64)], n=16, max_tokens=32, temperature=1.0))
    big.start()
    deadline = time.monotonic() + 60
    while not 0 < waiting() < 1024:  # its first batch has been taken
        assert time.monotonic() < deadline and big.is_alive()
        time.sleep(0.005)
    r = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=8)
    assert r.choices[0].message.content and big.is_alive() and waiting() > 0
    big.join()


def test_streaming_sends_tokens_as_they_are_generated(client):
    """Real streaming: the first token's chunk arrives while the answer is still being
    generated (well before the last), the chunks add up to the answer the same seeded
    request gets whole, and a `stop` string is never sent (the tail that could begin one is
    held back); a completions stream is its tokens, exactly."""
    import time

    ask = dict(model="tiny", messages=[{"role": "user", "content": "What is 7 + 8 - 3 + 4 - 9 + 2 - 6 + 5?"}],
               temperature=1.0, seed=5, max_tokens=200)  # worked step by step: about 26 tokens
    whole = client.chat.completions.create(**ask).choices[0].message.content
    start, arrivals, parts = time.perf_counter(), [], []
    for c in client.chat.completions.create(**ask, stream=True):
        if c.choices and c.choices[0].delta.content:
            arrivals.append(time.perf_counter() - start)
            parts.append(c.choices[0].delta.content)
    assert "".join(parts) == whole and len(parts) > 10
    # the first token's chunk well before the last (about 0.3 of the way here, warm; a whole answer sent as
    # chunks at its end would put the first within a millisecond of the last)
    assert arrivals[0] < 0.75 * arrivals[-1]
    word = whole.split()[len(whole.split()) // 2]
    cut = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True,
                                                                                            stop=[word]) if c.choices)
    assert cut == whole[: whole.index(word)]
    scored = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    joined = [x for c in client.chat.completions.create(**ask, stream=True, logprobs=True, top_logprobs=2)
              if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]  # as clients join them
    assert [x.token for x in joined] == [x.token for x in scored] and len(joined[0].top_logprobs) == 2
    assert [x.logprob for x in joined] == pytest.approx([x.logprob for x in scored], abs=1e-4)
    parts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="Once upon a time",
                                                                   max_tokens=40, temperature=1.0, seed=2,
                                                                   stream=True)]
    once = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=1.0, seed=2)
    assert "".join(parts) == once.choices[0].text and len([p for p in parts if p]) > 3


def test_fair_queue_takes_requests_in_turns():
    import asyncio

    from selfevolve.serving.fair_queue import FairQueue

    async def batches():
        q = FairQueue()
        for i in range(5):
            q.put("big", f"big{i}", 2)
        q.put("small", "small0")
        q.put("huge", "huge0", 10)
        return [await q.take(4) for _ in range(4)]

    assert asyncio.run(batches()) == [["big0", "small0"], ["huge0"], ["big1", "big2"], ["big3", "big4"]]


def test_fair_queue_serves_a_lower_priority_first():
    """A batch holds the lowest priority waiting only: background work (priority 1, an evolve
    round's) runs while no user request (priority 0) waits, and a user's request that arrives
    behind it is the next batch."""
    import asyncio

    from selfevolve.serving.fair_queue import FairQueue

    async def batches():
        q = FairQueue()
        for i in range(3):
            q.put("round", f"round{i}", 2, priority=1)
        first = await q.take(4)
        q.put("user", "user0")
        q.put("user2", "user1")
        return [first] + [await q.take(4) for _ in range(2)], q.requests, q.priority

    taken, left, priority = asyncio.run(batches())
    assert taken == [["round0", "round1"], ["user0", "user1"], ["round2"]]
    assert left == {} and priority == {}

    async def shorter():
        q = FairQueue()
        for i in range(4):
            q.put("round", f"round{i}", 2, priority=1)
            q.put("user", f"user{i}", 2)
        return [await q.take(8, background=2) for _ in range(3)]

    assert asyncio.run(shorter()) == [["user0", "user1", "user2", "user3"], ["round0"], ["round1"]]


def test_a_user_is_answered_before_a_background_request(client, server):
    """Over HTTP: with a priority-1 request of 1024 sequences queued, a priority-0 chat is
    answered after at most the batch in flight, and the background request still completes."""
    import threading
    import time

    def waiting():
        return httpx.get(server.url + "/health").json()["waiting_sequences"]

    done = {}
    big = threading.Thread(target=lambda: done.setdefault("big", client.completions.create(
        model="tiny", prompt=[f"What is {i % 9} + {i % 7}?" for i in range(64)], n=16, max_tokens=32,
        temperature=1.0, extra_body={"priority": 1})))
    big.start()
    deadline = time.monotonic() + 60
    while not 0 < waiting() < 1024:
        assert time.monotonic() < deadline and big.is_alive()
        time.sleep(0.005)
    before = waiting()
    r = client.chat.completions.create(model="tiny", messages=Q, temperature=0, max_tokens=8)
    assert r.choices[0].message.content and waiting() >= before - 2 * 64  # the batch in flight, and one more at most
    big.join()
    assert len(done["big"].choices) == 1024


def test_langchain_chat_openai_against_the_server(server):
    """The client LangChain users have: ChatOpenAI, plain and streaming."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, model="tiny", temperature=0, max_tokens=16,
                      max_retries=0)
    whole = chat.invoke("What is 7 + 8 - 3 + 4?").content
    assert whole and "".join(c.content for c in chat.stream("What is 7 + 8 - 3 + 4?")) == whole


def test_a_refinement_streams_its_drafts_as_reasoning_and_its_answer_as_content(client, server):
    """A refinement's attempts stream as they are generated: the drafts (attempts that may
    not be the answer) as `delta.reasoning_content`, as vLLM streams a reasoning model's
    thinking, then the last allowed attempt live as `content`; together they are what the
    same request gets whole and what the trace logs."""
    ask = dict(model="tiny", messages=Q, temperature=0, max_tokens=40,
               extra_body={"refine": {"critic": "verifier", "reference": "-1000", "max_turns": 3}})
    whole = client.chat.completions.create(**ask)
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    reasoning = [c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks]
    content = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(content) == whole.choices[0].message.content
    info = chunks[-1].model_extra["selfevolve"]
    assert info["turns"] == 3 and info["scores"] == whole.model_extra["selfevolve"]["scores"]
    logged = TraceStore(server.traces).get(info["trace_id"])
    assert "".join(reasoning) == "\n\n".join(t.response for t in logged.turns[:-1])
    assert "".join(content) == logged.final
    first_answer = next(i for i, c in enumerate(content) if c)
    assert sum(map(bool, reasoning[:first_answer])) > 5 and not any(reasoning[first_answer:])  # drafts, then answer
    assert sum(map(bool, content)) > 3  # the last attempt streamed token by token, not sent whole
    one = [c for c in client.chat.completions.create(**{**ask, "extra_body": {"refine": {"max_turns": 1}}}, stream=True)
           if c.choices]  # one attempt: it is the answer, streamed as such
    assert not any(c.choices[0].delta.model_extra.get("reasoning_content") for c in one)
    assert sum(bool(c.choices[0].delta.content) for c in one) > 3
    with pytest.raises(openai.BadRequestError, match="stop does not apply to a refinement"):
        client.chat.completions.create(**ask, stop=["."])
