"""The vllm tier, over HTTP: OpenAIPolicy, verified sync, recipes and a fleet against real
`vllm serve` processes (vLLM's CPU build; `bench/vllm-env.sh`). Skipped with one line where
SELFEVOLVE_VLLM_PYTHON is not set (tests/conftest.py)."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfevolve.data import arith
from selfevolve.errors import SyncError
from selfevolve.policies import OpenAIPolicy
from selfevolve.policies.fleet import FleetPolicy
from selfevolve.serving.process import VLLMServerProcess
from selfevolve.training.learner import sft, trainable_model
from selfevolve.training.publish import CANARY_TOL, canary_gap, publish, save_update
from selfevolve.types import SamplingParams
from tests.conftest import VLLM_PYTHON, tiny_path

pytestmark = pytest.mark.vllm

CONVS = [[{"role": "user", "content": "What is 1 + 1?"},
          {"role": "assistant", "content": "1 + 1 = 2. The answer is 2."}]] * 8


def questions(n: int, seed: int = 0) -> list[list[dict]]:
    tasks = arith.tasks("validation", n, seed=seed)
    return [[{"role": "user", "content": t.prompt}] for t in tasks]


def server_models(policy: OpenAIPolicy) -> set[str]:
    return {m.id for m in policy.client.models.list().data}


def learner_logprobs(model, tokenizer, conv, ids: list[int]) -> list[float]:
    """log p of `ids` after the chat prompt of `conv`, as the learner computes them."""
    prompt = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = prompt["input_ids"]
    x = torch.tensor([prompt + ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, len(prompt) - 1:-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


def test_openai_policy_samples_from_vllm(vllm_server):
    """Batched chat with n, a seed per request, token ids and log-probs of what was sampled
    (the stop token included, as vLLM returns it), aligned with what the learner computes on
    those ids; stop strings; raw completions."""
    policy = OpenAIPolicy(vllm_server.url)
    tok = AutoTokenizer.from_pretrained(tiny_path())
    model = AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.float32).eval()
    eos = tok.convert_tokens_to_ids("<|end|>")
    convs = questions(3)
    s = SamplingParams(n=2, temperature=1.0, max_new_tokens=64, seed=3, logprobs=True)
    a = policy.generate(convs + convs[:1], s)  # the first question twice
    assert [len(turns) for turns in a] == [2, 2, 2, 2]
    ids = [[t.token_ids for t in turns] for turns in a]
    assert ids[0] != ids[3], "each request has its own seed: the same prompt twice is two samples"
    stopped = 0
    for conv, turns in zip(convs + convs[:1], a):
        for t in turns:
            assert t.token_ids and len(t.logprobs) == len(t.token_ids)
            assert tok.decode(t.token_ids, skip_special_tokens=True).strip() == t.response
            if t.finish_reason == "stop":
                stopped += 1
                assert t.token_ids[-1] == eos  # the stop token is a sampled token
            mine = learner_logprobs(model, tok, conv, t.token_ids)
            assert max(abs(x - y) for x, y in zip(mine, t.logprobs)) < 1e-3
    assert stopped >= 4

    cut = policy.generate(convs, SamplingParams(max_new_tokens=64, stop=["="]))
    assert all("=" not in t.response for turns in cut for t in turns)
    assert any(t.finish_reason == "stop" and t.response for turns in cut for t in turns)
    done = policy.complete(["What is 2 + 3? 2 + 3 ="], SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=1))
    assert len(done[0]) == 2 and all(t.response for t in done[0])


def trained(tok, tmp_path, epochs: int = 1, dtype=torch.float32):
    torch.manual_seed(0)
    learner = trainable_model(tiny_path(), r=8, alpha=16, dtype=dtype)
    sft(learner, tok, CONVS, epochs=epochs, lr=5e-3, batch_size=4)
    return learner


def assert_wrong_weights_caught(url: str, policy: OpenAIPolicy, update, previous: list[float]) -> None:
    """`update` (saved as v2) verified on a server that answers "v2" with the version it
    replaces (`policy`'s v1), then with the base model: each caught and named."""
    wrong = OpenAIPolicy(url)  # the name answered by other weights on the real server
    wrong.adapters["v2"] = str(update.path)
    for served, what in ((policy.served_names["v1"], "the version it replaces"), (wrong.base_model, "the base model")):
        wrong.served_names["v2"] = served
        wrong.set_adapter("v2")
        with pytest.raises(SyncError, match="scores the canary as " + what):
            update.verify(wrong, "v2", previous=previous)


def test_verified_sync_against_vllm(vllm_server, tmp_path):
    """Load under a new name, the canary from vLLM's own log-probs; a server answering the
    name with the previous version or the base model is caught; a non-finite adapter is
    refused and rolled back; unload."""
    policy = OpenAIPolicy(vllm_server.url)
    tok = AutoTokenizer.from_pretrained(tiny_path())
    learner = trained(tok, tmp_path)
    v1 = publish(policy, learner, tok, tmp_path / "v1", "v1") and policy.prompt_logprobs(
        json.loads((tmp_path / "v1" / "canary.json").read_text())["text"])
    assert policy.active_adapter == "v1" and policy.served_names["v1"] in server_models(policy)
    sft(learner, tok, CONVS, epochs=1, lr=5e-3, batch_size=4)
    v2 = save_update(learner, tok, tmp_path / "v2")
    assert canary_gap(v2.expected, v1)[1] > CANARY_TOL[torch.float32][1]  # the update moved the canary

    assert_wrong_weights_caught(vllm_server.url, policy, v2, v1)

    v2.serve(policy, "v2", replaces="v1")
    assert policy.active_adapter == "v2" and "v1" not in policy.adapters
    assert not any(m.startswith("v1@") for m in server_models(policy))

    with torch.no_grad():  # a broken update: vLLM loads it, cannot score the canary (400), it is refused and unloaded
        next(p for n, p in learner.named_parameters() if "lora_B" in n).fill_(math.nan)
    with pytest.raises(SyncError, match="did not take adapter 'bad'"):
        publish(policy, learner, tok, tmp_path / "bad", "bad")
    assert policy.active_adapter == "v2" and "bad" not in policy.adapters
    assert not any(m.startswith("bad@") for m in server_models(policy))
    policy.unload_adapter("v2")
    assert not any("@" in m for m in server_models(policy))


def test_bf16_sync_catches_the_previous_version_and_the_base_model(vllm_bf16_server, tmp_path):
    """In bf16 (tolerances wide enough for bf16 kernels) a server answering with the version
    the update replaces, or with the base model, is caught and named: its log-probs are nearer
    that version than the update; the right load passes."""
    policy = OpenAIPolicy(vllm_bf16_server.url)
    tok = AutoTokenizer.from_pretrained(tiny_path())
    learner = trained(tok, tmp_path, dtype=torch.bfloat16)
    first = save_update(learner, tok, tmp_path / "v1")
    assert first.tol == CANARY_TOL[torch.bfloat16]
    first.serve(policy, "v1")  # a correct load passes
    v1 = policy.prompt_logprobs(first.canary)
    sft(learner, tok, CONVS, epochs=2, lr=5e-3, batch_size=4)
    v2 = save_update(learner, tok, tmp_path / "v2")
    assert_wrong_weights_caught(vllm_bf16_server.url, policy, v2, v1)
    v2.serve(policy, "v2", replaces="v1")  # and the right one passes
    assert policy.active_adapter == "v2"


def selfevolve_run(*args: str, python: str = sys.executable, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "selfevolve.cli", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, SELFEVOLVE_QUIET="1"))


SMALL_SCORE = ["recipe=score", "stage1_steps=2", "stage2_steps=2", "batch_tasks=8", "train_tasks=40", "eval_limit=16",
               "val_limit=8", "eval_every=4", "max_new_tokens=48"]
SMALL_REST_EM = ["recipe=rest_em", "iterations=1", "train_tasks=24", "num_samples=2", "eval_limit=16", "val_limit=8",
                 "epochs=1", "max_new_tokens=48", "sft_batch_size=8"]


def check_run(run_dir, loads: int, log: str | None = None) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"acc_t1", "acc_t2", "delta", "n"} <= set(summary["before"]) == set(summary["after"])
    if log is not None:  # every update was loaded into vLLM (and verified: a failed canary fails the run)
        with open(log) as f:
            assert sum('"POST /v1/load_lora_adapter HTTP/1.1" 200' in line for line in f) >= loads
    return summary


def test_recipes_with_policy_openai_on_vllm(vllm_server, tmp_path):
    """`selfevolve run recipe=score` (two steps of each stage) and `recipe=rest_em` (one
    iteration) with model= the vLLM URL: every update loaded into vLLM and verified before
    the next rollout; the summary as on the in-process path."""
    url = vllm_server.url + "/v1"
    with open(vllm_server.log) as f:
        before = sum('"POST /v1/load_lora_adapter HTTP/1.1" 200' in line for line in f)
    r = selfevolve_run(*SMALL_SCORE, "policy=openai", f"model={url}", f"run_dir={tmp_path / 'score'}")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(x) for x in (tmp_path / "score" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s and "eval" not in s]
    assert len(steps) == 4 and all(s["logprob_kl"] < 1e-3 for s in steps)  # learner and vLLM sample alike
    check_run(tmp_path / "score", before + 4, vllm_server.log)
    r = selfevolve_run(*SMALL_REST_EM, "policy=openai", f"model={url}", f"run_dir={tmp_path / 'rest_em'}")
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(tmp_path / "rest_em", before + 5, vllm_server.log)


def test_fleet_of_two_vllm_servers(vllm_server, tmp_path):
    """All-or-nothing sync over two real vLLM servers; one SIGKILLed, the fleet goes on with
    the other and the next update is verified on it."""
    tok = AutoTokenizer.from_pretrained(tiny_path())
    with VLLMServerProcess(VLLM_PYTHON, tiny_path(), str(tmp_path / "second.log")) as second:
        fleet = FleetPolicy([vllm_server.url, second.url])
        learner = trained(tok, tmp_path)
        publish(fleet, learner, tok, tmp_path / "v1", "v1")
        for replica in fleet.replicas:
            assert replica.active_adapter == "v1" and replica.served_names["v1"] in server_models(replica)
        # one replica cannot read the next update's directory: every replica stays on v1
        sft(learner, tok, CONVS, epochs=1, lr=5e-3, batch_size=4)
        update = save_update(learner, tok, tmp_path / "v2")
        real_load = fleet.replicas[1].load_adapter
        fleet.replicas[1].load_adapter = lambda path, name: real_load(str(tmp_path / "missing"), name)
        with pytest.raises(SyncError, match="rolled back"):
            update.serve(fleet, "v2", replaces="v1")
        fleet.replicas[1].load_adapter = real_load
        for replica in fleet.replicas:
            assert replica.active_adapter == "v1"
            assert not any(m.startswith("v2@") for m in server_models(replica))
        os.killpg(second.proc.pid, signal.SIGKILL)
        second.proc.wait()
        answers = fleet.generate(questions(4), SamplingParams(max_new_tokens=16))
        assert len(answers) == 4 and len(fleet.replicas) == 1  # the dead replica left the fleet
        update.serve(fleet, "v2", replaces="v1")
        assert fleet.replicas[0].active_adapter == "v2" and fleet.replicas[0].url == vllm_server.url + "/v1"
        fleet.replicas[0].unload_adapter("v2")


def test_the_gateway_in_front_of_vllm_and_evolve_promoting_into_it(vllm_server, tmp_path):
    """Issue 42: `selfevolve serve model=<vLLM URL>` logs vLLM's traffic with the token ids vLLM
    sampled (a system message and earlier turns kept with the task), relays vLLM's stream as
    it comes, and `selfevolve evolve` runs a round against it, loading into vLLM through it;
    a promoted version is what traffic asking for `evolved` gets, and its traces name it."""
    from pathlib import Path

    import openai

    from selfevolve.data.store import TraceStore
    from selfevolve.serving.process import ServerProcess
    from selfevolve.serving.server import adapter_version
    from tests.test_cli import cli

    traces = tmp_path / "traces.sqlite"
    with ServerProcess(f"model={vllm_server.url}/v1", f"traces={traces}", "verifier=numeric") as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="-", max_retries=0)
        base = client.models.list().data[0].id
        history = [{"role": "system", "content": "You are a calculator."},
                   {"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "The answer is 2."}]
        for i, task in enumerate(arith.tasks("train", n=64)):
            messages = [{"role": "user", "content": task.prompt}] if i % 2 else [*history, {"role": "user",
                                                                                          "content": task.prompt}]
            r = client.chat.completions.create(model=base, messages=messages, temperature=1.0, seed=i, max_tokens=32,
                                               extra_body={"reference": task.reference})
            assert r.choices[0].logprobs is None
        store = TraceStore(traces)
        logged = store.query()
        assert len(logged) == 64 and all(t.turns[0].token_ids and t.turns[0].score is not None for t in logged)
        assert logged[0].task.meta["messages"][:3] == history
        chunks = list(client.chat.completions.create(model=base, messages=history[1:2], temperature=0, max_tokens=24,
                                                     stream=True))
        assert len(chunks) > 3  # vLLM streams token by token, and the gateway passes that on
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert store.get(chunks[-1].model_extra["selfevolve"]["trace_id"]).final == text.strip()

        r = cli("evolve", f"model={gateway.url}/v1", f"traces={traces}", "recipe=rest_em", "iterations=1",
                "num_samples=2", "epochs=1", "max_new_tokens=32", "eval_limit=8", "val_limit=24", "every=40",
                "poll_s=0.3", "rounds=1", f"run_dir={tmp_path / 'evolve'}")
        assert r.returncode == 0, r.stderr[-3000:]
        state = json.loads((tmp_path / "evolve" / "state.json").read_text())
        lineage = json.loads((tmp_path / "evolve" / "lineage.json").read_text())
        node = next(n for n in lineage["nodes"] if n["id"] == "round-0")
        assert state["round"] == 1 and node["decision"] in ("promoted", "rejected")
        with open(vllm_server.log) as f:
            assert any('"POST /v1/load_lora_adapter HTTP/1.1" 200' in line for line in f)  # through the gateway
        if node["decision"] == "rejected":  # the gate's call, not the mechanism's: promote it as evolve does
            from selfevolve.cli import _config_path, _recipe
            from selfevolve.config import build
            from selfevolve.evolve import Evolve, EvolveConfig

            ev = Evolve(build(EvolveConfig, {"model": gateway.url + "/v1", "traces": str(traces),
                                             "run_dir": str(tmp_path / "evolve"), "resume": True}),
                        {}, _recipe, _config_path)
            ev.promote(OpenAIPolicy(gateway.url), Path(node["adapter"]))  # load_inplace, canary-verified
        assert "evolved" in {m.id for m in OpenAIPolicy(vllm_server.url).client.models.list().data}
        r = client.chat.completions.create(model="evolved", messages=history[1:2], temperature=0, max_tokens=16)
        assert store.get(r.model_extra["selfevolve"]["trace_id"]).policy_version == adapter_version(
            "evolved", node["adapter"])
        store.close()
