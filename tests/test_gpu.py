"""The GPU path: the learner on CUDA in bf16, verified sync in bf16, one SCoRe step, and —
where vLLM is installed — VLLMPolicy generating and hot-loading an adapter with the canary.
Run with `pytest -m gpu` on a machine with a CUDA device; skipped elsewhere (never in CI)."""

import importlib.util
import json

import pytest
import torch

from selfevolve.build import learner_base
from selfevolve.config import RecipeConfig
from selfevolve.policies import HFPolicy
from selfevolve.training.learner import trainable_model
from selfevolve.training.publish import publish
from selfevolve.types import SamplingParams
from tests.test_cli import cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _perturbed_learner(base):
    learner = trainable_model(base.path, r=8, alpha=16, device=base.device, dtype=base.dtype)
    for p in learner.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    return learner


def test_learner_on_cuda_in_bf16_and_verified_sync(tmp_path):
    policy = HFPolicy("tiny", device="cuda")  # dtype auto: bf16 on CUDA
    base = learner_base(RecipeConfig(model="tiny", device="cuda"), policy)
    assert base.device.type == "cuda" and base.dtype == torch.bfloat16
    learner = _perturbed_learner(base)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in learner.parameters() if p.requires_grad)
    served = publish(policy, learner, base.tokenizer, tmp_path / "a", "a")  # bf16 canary tolerance
    assert served.active_adapter == "a"


def test_one_score_step_on_cuda(tmp_path):
    r = cli("run", "recipe=score", "device=cuda", "stage1_steps=1", "stage2_steps=1", "batch_tasks=16",
            "train_tasks=32", "eval_limit=16", "val_limit=16", "micro_batch_size=8", f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["after"]["n"] == 16


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_generates_and_hot_loads_a_verified_adapter(tmp_path):
    from selfevolve.policies import VLLMPolicy

    policy = VLLMPolicy("tiny", gpu_memory_utilization=0.3, dtype="bfloat16")
    outs = policy.generate([[{"role": "user", "content": "What is 2 + 3?"}]] * 4,
                           SamplingParams(temperature=1.0, seed=0, max_new_tokens=16))
    assert len(outs) == 4 and all(o[0].finish_reason in ("stop", "length") for o in outs)
    base = learner_base(RecipeConfig(model="tiny", device="cuda", dtype="bfloat16", policy="vllm"), policy)
    learner = _perturbed_learner(base)
    for version in ("v1", "v2"):  # a second load gets a fresh LoRA id, so vLLM serves the new weights
        replaces = "v1" if version == "v2" else None
        served = publish(policy, learner, base.tokenizer, tmp_path / version, version, replaces=replaces)
        assert served.active_adapter == version
    old_id = policy.requests["v2"].lora_int_id  # a new version under an old name frees the old one's slot
    policy.load_adapter(str(tmp_path / "v2"), "v2")
    assert old_id not in policy.llm.llm_engine.list_loras()
