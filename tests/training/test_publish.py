"""Verified sync with HFPolicy: publish a trained update, check the canary, catch a stale one."""

import pytest
import torch

from selfevolve.policies import HFPolicy
from selfevolve.training.learner import sft, trainable_model
from selfevolve.training.publish import (
    CANARY,
    SyncError,
    canary_logprobs,
    publish,
    save_update,
    text_logprob,
    verify_sync,
)

CONVS = [[{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant",
                                                          "content": "1 + 1 = 2. The answer is 2."}]] * 8


def test_publish_serves_the_learner_and_the_canary_agrees(tmp_path):
    policy = HFPolicy("tiny", device="cpu")
    base = sum(policy.prompt_logprobs(CANARY))
    learner = trainable_model("tiny", r=4, alpha=8)
    sft(learner, policy.tokenizer, CONVS, epochs=2, lr=5e-3, batch_size=4)
    publish(policy, learner, policy.tokenizer, tmp_path / "u1", "u1")
    assert policy.active_adapter == "u1" and (tmp_path / "u1" / "adapter_config.json").exists()
    assert sum(policy.prompt_logprobs(CANARY)) == pytest.approx(text_logprob(learner, policy.tokenizer), abs=1e-4)
    assert abs(sum(policy.prompt_logprobs(CANARY)) - base) > 1e-3

    with torch.no_grad():  # the learner moves on; the policy still serves the old version
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    with pytest.raises(SyncError, match="canary"):
        verify_sync(policy, "u1", canary_logprobs(learner, policy.tokenizer))
    policy.set_adapter(None)
    with pytest.raises(SyncError, match="reports adapter None"):
        verify_sync(policy, "u1", canary_logprobs(learner, policy.tokenizer))

    publish(policy, learner, policy.tokenizer, tmp_path / "u1b", "u1")  # a new version, same name
    assert sum(policy.prompt_logprobs(CANARY)) == pytest.approx(text_logprob(learner, policy.tokenizer), abs=1e-4)
    policy.unload_adapter("u1")
    assert policy.active_adapter is None and sum(policy.prompt_logprobs(CANARY)) == pytest.approx(base, abs=1e-5)


class Reports:
    """A served policy that reports adapter `name` as active and scores with `inner`."""

    def __init__(self, name, inner):
        self.active_adapter, self.inner = name, inner

    def prompt_logprobs(self, text):
        return self.inner.prompt_logprobs(text)


def test_a_policy_serving_the_previous_version_or_the_base_model_is_caught(tmp_path):
    """The check discriminates: with tolerances wide enough to pass either wrong model
    (bf16's), a policy that kept the version it replaces, or serves the base model, fails
    because it is closer to that than to the update; the right load passes."""
    policy = HFPolicy("tiny", device="cpu")
    learner = trainable_model("tiny", r=4, alpha=8)
    sft(learner, policy.tokenizer, CONVS, epochs=1, lr=5e-3, batch_size=4)
    wide = (10.0, 0.04)  # bf16's mean tolerance; nothing is refused for one token far off
    publish(policy, learner, policy.tokenizer, tmp_path / "v1", "v1", tol=wide)
    v1 = policy.prompt_logprobs(CANARY)
    sft(learner, policy.tokenizer, CONVS, epochs=1, lr=5e-3, batch_size=4)
    v2 = save_update(learner, policy.tokenizer, tmp_path / "v2", tol=wide)
    stale = Reports("v2", policy)  # a server that says "v2" and still serves v1
    with pytest.raises(SyncError, match="the version it replaces"):
        v2.verify(stale, "v2", previous=v1)
    base = Reports("v2", HFPolicy("tiny", device="cpu"))  # ... or serves the base model
    with pytest.raises(SyncError, match="the base model"):
        v2.verify(base, "v2", previous=v1)
    v2.serve(policy, "v2", replaces="v1")  # the right load passes both comparisons
    assert policy.active_adapter == "v2" and "v1" not in policy.adapters


def test_full_weights_publish(tmp_path):
    policy = HFPolicy("tiny", device="cpu")
    learner = trainable_model("tiny", lora=False)
    with torch.no_grad():
        learner.lm_head.weight.mul_(1.01)
    served = publish(policy, learner, policy.tokenizer, tmp_path / "full", "full", lora=False)
    assert served is not policy and sum(served.prompt_logprobs(CANARY)) == pytest.approx(
        text_logprob(learner, policy.tokenizer), abs=1e-4
    )


def test_trained_embedding_rows_are_published_verified_and_continued(tmp_path):
    """Rows trained with the adapter (SELF's feedback words) reach the served model, the
    canary covers them, and a learner continued from the saved adapter starts where it was."""
    from selfevolve.errors import UserError
    from selfevolve.policies.vllm import check_lora_only
    from selfevolve.training.publish import canary_for, trained_token_ids

    policy = HFPolicy("tiny", device="cpu")
    ids = sorted(set(policy.tokenizer(" has no errors", add_special_tokens=False)["input_ids"]))
    learner = trainable_model("tiny", r=4, alpha=8, trainable_tokens=ids)
    assert trained_token_ids(learner) == ids and canary_for(learner, policy.tokenizer).startswith(CANARY + " ")
    text = "The answer has no errors."
    convs = [[{"role": "user", "content": "Check: 1 + 1 = 2"}, {"role": "assistant", "content": text}]] * 8
    base = text_logprob(learner, policy.tokenizer, text)
    sft(learner, policy.tokenizer, convs, epochs=3, lr=1e-3, batch_size=4, token_lr=1e-2)
    trained = text_logprob(learner, policy.tokenizer, text)
    assert trained > base + 1.0  # the words became likely
    publish(policy, learner, policy.tokenizer, tmp_path / "tok", "tok")
    assert sum(policy.prompt_logprobs(text)) == pytest.approx(trained, abs=1e-3)

    again = trainable_model("tiny", r=4, alpha=8, init_from=str(tmp_path / "tok"), trainable_tokens=ids)
    assert text_logprob(again, policy.tokenizer, text) == pytest.approx(trained, abs=1e-4)
    with pytest.raises(UserError, match="trains token embeddings"):
        check_lora_only(str(tmp_path / "tok"))
    check_lora_only(str(tmp_path / "missing"))  # nothing to refuse
