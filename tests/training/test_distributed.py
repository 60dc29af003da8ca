"""The data-parallel learner (selfevolve/training/distributed.py) under a real torchrun with gloo: one
SFT, one SCoRe and one SPIN step on two processes give the update one process gives on the
combined batch — which holds only if every batch-wide statistic (token counts, the
leave-one-out baseline, the pair mean) is taken over all ranks. And the recipes end to end
with nproc=2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfevolve.data.store import TraceStore
from tests.test_cli import EXE, cli

ROOT = Path(__file__).resolve().parents[2]


def steps(out: Path, nproc: int) -> dict:
    """tests/training/ddp_steps.py in `nproc` processes (1: plain python, no process group)."""
    launch = ([sys.executable] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "training" / "ddp_steps.py"
    done = subprocess.run([*launch, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


def test_two_processes_take_the_step_one_process_takes_on_the_whole_batch(tmp_path):
    one, two = steps(tmp_path / "one", 1), steps(tmp_path / "two", 2)
    init = one.pop("init")
    assert torch.equal(torch.cat([v.flatten() for k, v in init.items() if k != "grad"]),
                       torch.cat([v.flatten() for k, v in two.pop("init").items() if k != "grad"]))
    init.pop("grad")
    assert set(one) == set(two) == {"sft", "score", "spin"}
    for name in one:
        g1, g2 = one[name].pop("grad"), two[name].pop("grad")
        # The gradient each process applied is the combined batch's: fp32 summation-order noise only.
        scale = max(g.abs().max() for g in g1.values())
        assert g1.keys() == g2.keys() and len(g1) > 0
        for k in g1:
            assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6 * scale), (name, k, (g1[k] - g2[k]).abs().max())
        # The adapters: AdamW's first step is lr·g/(|g| + eps), which amplifies that noise only
        # where |g| is near eps; 1e-4 is 1% of the step (lr = 1e-2) and the adapter moved by a full step.
        for k in one[name]:
            assert torch.allclose(one[name][k], two[name][k], rtol=0, atol=1e-4), (name, k)
        moved = max((one[name][k] - init[k]).abs().max() for k in init)
        assert moved > 5e-3, (name, moved)


@pytest.mark.slow  # the default run has rest_em with two learner processes (tests/test_fleet.py)
def test_spin_runs_end_to_end_with_two_learner_processes(tmp_path):
    """nproc=2 launches torchrun; rank 0 alone writes the run directory, which holds what a
    one-process run's holds: every rank's samples in the store once, the summary. (rest_em
    with nproc=2: tests/test_fleet.py, on two rollout servers.)"""
    for recipe, keys in (("spin", ["iterations=1", "train_tasks=12", "epochs=1", "pair_batch_size=4"]),):
        run_dir = tmp_path / recipe
        r = cli("run", f"recipe={recipe}", "nproc=2", f"run_dir={run_dir}", "eval_limit=8", "val_limit=8",
                "max_new_tokens=12", *keys)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["after"]["n"] == 8
        phase = "e_step" if recipe == "rest_em" else "opponent"
        sampled = TraceStore(run_dir / "traces.sqlite").query(meta={"phase": phase})
        per_task = 2 if recipe == "rest_em" else 1
        assert len(sampled) == 12 * per_task  # both ranks' shards, stored once
        assert len({t.task.id for t in sampled}) == 12
        assert (run_dir / "adapters" / "iter-0" / "adapter_config.json").exists()


@pytest.mark.slow
def test_score_with_two_learner_processes_resumes_to_the_same_summary(tmp_path):
    """SCoRe with nproc=2, killed (every process of torchrun's group) after its first
    checkpoint and resumed, ends as the uninterrupted two-process run does."""
    keys = ["recipe=score", "nproc=2", "stage1_steps=2", "stage2_steps=2", "batch_tasks=8", "eval_limit=8",
            "val_limit=8", "max_new_tokens=12", "eval_every=2", "checkpoint_every=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = cli("run", *keys, f"run_dir={whole}")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]  # rank 0 logs each step once

    env = {**os.environ, "SELFEVOLVE_QUIET": "1"}
    proc = subprocess.Popen([EXE, "run", *keys, f"run_dir={cut}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 600
    while time.time() < deadline and not (cut / "checkpoint" / "state.pt").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists()
    r = cli("run", *keys, f"run_dir={cut}", "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((cut / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert TraceStore(cut / "traces.sqlite").count() == TraceStore(whole / "traces.sqlite").count()
