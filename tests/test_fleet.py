"""A rollout fleet (`model=URL1,URL2`): two real `selfevolve serve` processes on loopback.
Requests spread over both and survive a killed replica; an adapter reaches every replica or
none (a replica that refuses it, or fails its check, rolls the other back and raises
SyncError naming it; `on_sync_error=drop` goes on without it); versions get names of their
own and at most `keep_adapters` stay loaded."""

import json
import subprocess
import sys
import time

import httpx
import pytest
import torch

from selfevolve import SamplingParams
from selfevolve.errors import SyncError
from selfevolve.policies import load_policy
from selfevolve.serving.process import ServerProcess
from selfevolve.training.learner import trainable_model
from selfevolve.training.publish import CANARY, publish, text_logprob

Q = [[{"role": "user", "content": f"What is {i} + 3?"}] for i in range(12)]


def learner(seed: int):
    m = trainable_model("tiny", r=4, alpha=8)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def served(replica) -> list[str]:
    return sorted(m["id"] for m in httpx.get(replica.url + "/models").json()["data"] if "@" in m["id"])


@pytest.fixture
def pair(tmp_path):
    with ServerProcess(f"traces={tmp_path / 'a.sqlite'}") as a, ServerProcess(f"traces={tmp_path / 'b.sqlite'}") as b:
        yield a, b


def test_requests_spread_over_replicas_and_survive_a_killed_one(pair, tiny):
    a, b = pair
    fleet = load_policy(f"{a.url}/v1,{b.url}", "openai")
    assert [r.url for r in fleet.replicas] == [a.url + "/v1", b.url + "/v1"]
    greedy = SamplingParams(max_new_tokens=12)
    turns = fleet.generate(Q, greedy)
    # both replicas serve the same weights: greedy answers are the in-process policy's
    assert [t[0].response for t in turns] == [t[0].response for t in tiny.generate(Q, greedy)]
    b.stop()
    with pytest.warns(UserWarning, match="left the fleet"):
        again = fleet.generate(Q, greedy)
    assert [t[0].response for t in again] == [t[0].response for t in turns]
    assert [r.url for r in fleet.replicas] == [a.url + "/v1"] and b.url + "/v1" in fleet.dropped


def test_an_adapter_reaches_every_replica_or_none(pair, tmp_path, tiny):
    a, b = pair
    fleet = load_policy(f"{a.url},{b.url}", "openai", keep_adapters=2)
    tok = tiny.tokenizer
    first = learner(1)
    publish(fleet, first, tok, tmp_path / "v1", "v1")
    for r in fleet.replicas:  # each replica serves the learner (publish checked each canary)
        assert r.active_adapter == "v1" and sum(r.prompt_logprobs(CANARY)) == pytest.approx(text_logprob(first, tok),
                                                                                       rel=1e-4)
    before = [served(r) for r in fleet.replicas]

    # the second replica's check fails: the first is rolled back to v1, and the error names the second
    second = learner(2)
    second.save_pretrained(tmp_path / "v2")
    from selfevolve.training.publish import load_everywhere

    def check(replica):
        if replica.url.startswith(b.url):
            raise SyncError("canary log-prob differs")

    with pytest.raises(SyncError, match=f"replica {b.url}/v1 did not take adapter 'v2'.*rolled back to 'v1'"):
        load_everywhere(fleet, tmp_path / "v2", "v2", check)
    assert [served(r) for r in fleet.replicas] == before
    assert all(r.active_adapter == "v1" for r in fleet.replicas)
    assert sum(fleet.prompt_logprobs(CANARY)) == pytest.approx(text_logprob(first, tok), rel=1e-4)

    # a new version of v1 under the same name: a new server-side name, the old one unloaded
    publish(fleet, second, tok, tmp_path / "v1b", "v1")
    assert all(len(served(r)) == 1 and served(r) != old for r, old in zip(fleet.replicas, before))
    # at most keep_adapters versions stay loaded
    for k in range(3):
        publish(fleet, learner(10 + k), tok, tmp_path / f"k{k}", f"k{k}")
    assert all(len(served(r)) == 2 for r in fleet.replicas) and sorted(fleet.adapters) == ["k1", "k2"]


def test_a_replica_that_refuses_rolls_back_or_is_dropped(tmp_path, tiny):
    with ServerProcess(f"traces={tmp_path / 'a.sqlite'}") as a, \
            ServerProcess("allow_adapter_updates=false", f"traces={tmp_path / 'b.sqlite'}") as b:
        tok = tiny.tokenizer
        fleet = load_policy(f"{a.url},{b.url}", "openai")
        with pytest.raises(SyncError, match=f"replica {b.url}/v1 did not take adapter 'v1'.*403.*rolled back to None"):
            publish(fleet, learner(1), tok, tmp_path / "v1", "v1")
        assert served(fleet.replicas[0]) == [] and fleet.active_adapter is None

        fleet = load_policy(f"{a.url},{b.url}", "openai", on_sync_error="drop")
        with pytest.warns(UserWarning, match=f"replica {b.url}/v1 left the fleet: adapter 'v1' did not sync"):
            publish(fleet, learner(1), tok, tmp_path / "v1", "v1")
        assert [r.url for r in fleet.replicas] == [a.url + "/v1"] and fleet.active_adapter == "v1"


def test_a_run_finishes_when_a_replica_is_killed_mid_run(pair, tmp_path):
    a, b = pair
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfevolve.cli", "run", "recipe=score", "stage1_steps=2", "stage2_steps=2",
         "batch_tasks=8", "train_tasks=16", "eval_limit=4", "val_limit=4", "max_new_tokens=16", "policy=openai",
         f"model={a.url},{b.url}", f"run_dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or "step" not in (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    b.stop()  # after the first update: rollouts, syncs and evaluations go on without it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"replica {b.url}/v1 left the fleet" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["n"] == 4
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kls = [s["logprob_kl"] for s in steps if "logprob_kl" in s]
    assert len(kls) == 4 and max(kls) < 1e-4, kls  # the learner scores the servers' samples as they did
    assert [v.split("@")[0] for v in served(load_policy(a.url))] == ["step-4"]  # the last update, only


def test_rest_em_with_two_learner_processes_on_two_rollout_servers(pair, tmp_path):
    """nproc=2 and model=URL1,URL2 together: each rank sends its shard to the fleet and loads
    its own versioned copy of every adapter on both replicas; the run ends with the selected
    adapter on both, from each rank."""
    a, b = pair
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "selfevolve.cli", "run", "recipe=rest_em", "nproc=2", "iterations=2", "train_tasks=12",
         "num_samples=2", "epochs=1", "eval_limit=4", "val_limit=4", "max_new_tokens=16", "policy=openai",
         f"model={a.url},{b.url}", f"run_dir={run_dir}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["n"] == 4
    for replica in (a, b):
        by_rank: dict[str, list[str]] = {}
        for n in served(load_policy(replica.url)):  # NAME@SESSION-N: a session per rank
            name, version = n.split("@")
            by_rank.setdefault(version.rsplit("-", 1)[0], []).append(name)
        assert len(by_rank) == 2 and len({tuple(v) for v in by_rank.values()}) == 1, by_rank
        assert f"iter-{summary['best_iteration']}" in "".join(next(iter(by_rank.values())))


def test_a_replica_restarted_on_its_port_is_dropped_not_fatal(pair, tmp_path, tiny):
    """Issue 33: a replica killed and restarted where it was between rollouts serves the base
    model without the fleet's adapters; its 404 for the adapter drops it (with a warning)
    and the request is answered by a replica that has the adapter."""
    a, b = pair
    fleet = load_policy(f"{a.url},{b.url}", "openai")
    first = learner(1)
    publish(fleet, first, tiny.tokenizer, tmp_path / "v1", "v1")
    greedy = SamplingParams(max_new_tokens=12)
    before = [t[0].response for t in fleet.generate(Q, greedy)]
    b.proc.kill()
    b.proc.wait()
    restarted = ServerProcess(f"traces={tmp_path / 'b2.sqlite'}", port=b.port)
    try:
        with pytest.warns(UserWarning, match="does not serve the fleet's adapter 'v1'"):
            after = [t[0].response for t in fleet.generate(Q, greedy)]
        assert after == before and [r.url for r in fleet.replicas] == [a.url + "/v1"]
    finally:
        restarted.stop()
