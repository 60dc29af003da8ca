"""Bounded staleness (`max_staleness=K`, SCoRe): K=0 is the synchronous run exactly; K=1
samples each batch with the adapter one update old and corrects it; the serving thread runs
jobs in submission order and stops at the first failure; a stopped K=1 run resumes."""

import random
import signal
import subprocess
import time

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from selfevolve.data.store import TraceStore
from selfevolve.errors import UserError
from tests.recipes.resume import _observe
from tests.test_cli import EXE, cli

KEYS = {"stage1_steps": 1, "stage2_steps": 2, "batch_tasks": 8, "train_tasks": 40, "eval_limit": 8, "val_limit": 8,
        "eval_every": 2, "checkpoint_every": 1, "max_new_tokens": 24}


def _config(run_dir, **kw):
    from selfevolve.config import build
    from selfevolve.recipes.score import ScoreConfig

    return build(ScoreConfig, {"recipe": "score", "run_dir": str(run_dir), **KEYS, **kw})


def _run_recipe(cfg):
    """What `selfevolve run` does in its process."""
    from selfevolve.recipes import score
    from selfevolve.run import Run

    torch.manual_seed(cfg.seed)
    run = Run(cfg)
    score.main(cfg, run)
    return run


def _synchronous(cfg):
    """The synchronous algorithm written out with no serving thread: rollouts, update, publish,
    one after the other. Returns each step's responses and the final adapter."""
    from selfevolve.build import learner_base, served_policy
    from selfevolve.data.sources import tasks_for
    from selfevolve.recipes.score import rollouts, stage_of, train_step
    from selfevolve.run import Run
    from selfevolve.training.publish import publish

    torch.manual_seed(cfg.seed)
    run = Run(cfg)
    policy = served_policy(cfg)
    base = learner_base(cfg, policy)
    learner = base.learner(cfg)
    learner.train()
    opt = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    pool = tasks_for(cfg, cfg.train_split, cfg.train_tasks)
    responses = []
    for step in range(cfg.stage1_steps + cfg.stage2_steps):
        batch = random.Random(f"{cfg.seed}:{step}").sample(pool, cfg.batch_tasks)
        traces, _ = rollouts(policy, batch, run.verifier, cfg, step, run)
        responses.append([[turn.response for turn in t.turns] for t in traces])
        train_step(learner, opt, traces, base.tokenizer, base.tokenizer.pad_token_id, stage_of(step, cfg), cfg, step)
        policy = publish(policy, learner, base.tokenizer, run.dir / f"u{step + 1}", f"step-{step + 1}",
                         replaces=f"step-{step}" if step else None)
    return responses, get_peft_model_state_dict(learner)


def _rollouts(store, step):
    """Step `step`'s rollouts (evaluations are stored with a round too)."""
    return store.query(round=step, meta={"stage": 1 if step < KEYS["stage1_steps"] else 2})


def _responses(run_dir, steps):
    store = TraceStore(run_dir / "traces.sqlite")
    return [[[turn.response for turn in t.turns] for t in _rollouts(store, s)] for s in range(steps)]


def test_max_staleness_0_is_the_synchronous_run(tmp_path):
    run = _run_recipe(_config(tmp_path / "k0", max_staleness=0))
    responses, adapter = _synchronous(_config(tmp_path / "sync"))
    assert _responses(run.dir, 3) == responses  # the same samples, step for step
    final = load_file(run.dir / "adapters" / "final" / "adapter_model.safetensors")
    assert final.keys() == adapter.keys()
    assert all(torch.equal(final[k], adapter[k]) for k in adapter)  # and bit for bit the same adapter


def test_max_staleness_1_samples_with_the_previous_update_and_corrects(tmp_path):
    run = _run_recipe(_config(tmp_path / "k1", max_staleness=1))
    store = TraceStore(run.dir / "traces.sqlite")
    # step 2's batch was generated while update 1 trained: the base model sampled it
    assert [{t.policy_version for t in _rollouts(store, s)} for s in range(3)] == [{None}, {None}, {"step-1"}]
    train = [m for m in run.metrics() if "reward_t1" in m]
    assert [m["staleness"] for m in train] == [0, 1, 1]
    assert "is_weight" not in train[0]  # on-policy: no correction
    assert all(0 < m["is_weight"] <= 2.0 for m in train[1:])  # capped at is_cap


@pytest.mark.slow
def test_a_stopped_run_with_max_staleness_resumes(tmp_path):
    """Ctrl-C after the first update: the in-flight batch is dropped with the process, and the
    resumed run regenerates it from the checkpoint's adapter (staleness 0 there)."""
    d = tmp_path / "run"
    args = ["recipe=score", *(f"{k}={v}" for k, v in (KEYS | {"stage2_steps": 3}).items()), "max_staleness=1",
            f"run_dir={d}"]
    proc = subprocess.Popen([EXE, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any("step" in m for m in _observe(d)[0]):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    done = _observe(d)[1]["step"]
    r = cli("run", *args, "resume=true")
    assert r.returncode == 0, r.stderr
    store = TraceStore(d / "traces.sqlite")
    assert sum(len(_rollouts(store, s)) for s in range(4)) == 4 * 8
    assert {t.policy_version for t in _rollouts(store, done)} == {f"step-{done}"}
    staleness = {m["step"]: m["staleness"] for m in [*_observe(d)[0]] if "staleness" in m}
    assert staleness[done + 1] == 0 and staleness[4] == 1


def test_the_serving_thread_keeps_order_and_stops_at_a_failure(tiny, tmp_path):
    from selfevolve.training.rollout_thread import ServingThread

    ran = []
    with ServingThread(tiny) as serving:
        for i in range(5):
            serving.submit(lambda policy, i: ran.append((i, policy.active_adapter)), i)
        assert serving.drain() is tiny and [i for i, _ in ran] == [0, 1, 2, 3, 4]
        failed = serving.submit(lambda policy: policy.load_adapter(str(tmp_path / "missing"), "v1"))
        later = serving.submit(lambda policy: ran.append("sampled by whatever the failed load left"))
        with pytest.raises(UserError):
            later.result()
        assert isinstance(failed.exception(), UserError) and len(ran) == 5
        with pytest.raises(UserError):
            serving.drain()


def test_max_staleness_needs_the_samplers_logprobs(tmp_path):
    r = cli("run", "recipe=score", "max_staleness=1", "logprob_check=0", f"run_dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "logprob_check=0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
