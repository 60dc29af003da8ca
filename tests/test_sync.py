"""Verified sync with HFPolicy: publish a trained update, check the canary, catch a stale one."""

import pytest
import torch

from selfevolve.policies import HFPolicy
from selfevolve.sync import CANARY, SyncError, publish, text_logprob, verify_sync
from selfevolve.training import sft, trainable_model

CONVS = [[{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant",
                                                          "content": "1 + 1 = 2. The answer is 2."}]] * 8


def test_publish_serves_the_learner_and_the_canary_agrees(tmp_path):
    policy = HFPolicy("tiny", device="cpu")
    base = policy.prompt_logprob(CANARY)
    learner = trainable_model("tiny", r=4, alpha=8)
    sft(learner, policy.tokenizer, CONVS, epochs=2, lr=5e-3, batch_size=4)
    publish(policy, learner, policy.tokenizer, tmp_path / "u1", "u1")
    assert policy.active_adapter == "u1" and (tmp_path / "u1" / "adapter_config.json").exists()
    assert policy.prompt_logprob(CANARY) == pytest.approx(text_logprob(learner, policy.tokenizer), abs=1e-4)
    assert abs(policy.prompt_logprob(CANARY) - base) > 1e-3

    with torch.no_grad():  # the learner moves on; the policy still serves the old version
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    with pytest.raises(SyncError, match="canary"):
        verify_sync(policy, "u1", text_logprob(learner, policy.tokenizer))
    policy.set_adapter(None)
    with pytest.raises(SyncError, match="reports adapter None"):
        verify_sync(policy, "u1", 0.0)

    publish(policy, learner, policy.tokenizer, tmp_path / "u1b", "u1")  # a new version, same name
    assert policy.prompt_logprob(CANARY) == pytest.approx(text_logprob(learner, policy.tokenizer), abs=1e-4)
    policy.unload_adapter("u1")
    assert policy.active_adapter is None and policy.prompt_logprob(CANARY) == pytest.approx(base, abs=1e-5)


def test_full_weights_publish(tmp_path):
    policy = HFPolicy("tiny", device="cpu")
    learner = trainable_model("tiny", lora=False)
    with torch.no_grad():
        learner.lm_head.weight.mul_(1.01)
    served = publish(policy, learner, policy.tokenizer, tmp_path / "full", "full", lora=False)
    assert served is not policy and served.prompt_logprob(CANARY) == pytest.approx(
        text_logprob(learner, policy.tokenizer), abs=1e-4
    )


def test_trained_embedding_rows_are_published_verified_and_continued(tmp_path):
    """Rows trained with the adapter (SELF's feedback words) reach the served model, the
    canary covers them, and a learner continued from the saved adapter starts where it was."""
    from selfevolve.errors import UserError
    from selfevolve.policies.vllm import check_lora_only
    from selfevolve.sync import canary_for, trained_token_ids

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
    assert policy.prompt_logprob(text) == pytest.approx(trained, abs=1e-3)

    again = trainable_model("tiny", r=4, alpha=8, init_from=str(tmp_path / "tok"), trainable_tokens=ids)
    assert text_logprob(again, policy.tokenizer, text) == pytest.approx(trained, abs=1e-4)
    with pytest.raises(UserError, match="trains token embeddings"):
        check_lora_only(str(tmp_path / "tok"))
    check_lora_only(str(tmp_path / "missing"))  # nothing to refuse
