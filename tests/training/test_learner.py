"""Training primitives: micro-batched SFT equals the full batch, the learner lives where the
served model does, and non-finite values stop before anything is stepped or served."""

import math

import pytest
import torch

from selfevolve.build import learner_base
from selfevolve.config import RecipeConfig
from selfevolve.data import arith
from selfevolve.errors import NonFinite, SyncError
from selfevolve.policies import HFPolicy
from selfevolve.training.learner import optimizer_step, sft, trainable_model
from selfevolve.training.publish import CANARY, canary_tolerance, publish, verify_sync
from tests.test_cli import cli


def _convs(n=12):
    return [[{"role": "user", "content": t.prompt}, {"role": "assistant", "content": f"The answer is {t.reference}."}]
            for t in arith.tasks("train", n, seed=3)]


def test_micro_batched_sft_trains_the_same_adapter():
    adapters = []
    for mbs in (None, 5):
        torch.manual_seed(0)
        model = trainable_model("tiny", r=4, alpha=8)
        stats = sft(model, HFPolicy("tiny", device="cpu").tokenizer, _convs(), batch_size=12, micro_batch_size=mbs)
        adapters.append((stats, torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])))
    (s_full, a_full), (s_mb, a_mb) = adapters
    assert s_mb["sft_loss"] == pytest.approx(s_full["sft_loss"], abs=1e-5)
    assert s_mb["sft_tokens"] == s_full["sft_tokens"]
    # the same up to float summation order, which Adam amplifies on parameters with ~0 gradient
    # (measured: one of 40,960 all-linear LoRA weights 6.5e-6 apart, mean 2e-10; weights ~0.09)
    assert torch.allclose(a_mb, a_full, atol=2e-5)


def test_the_learner_lives_where_the_served_model_does_and_publishes_in_bf16(tmp_path):
    """A bf16 served model gets a bf16 learner base (adapter weights stay fp32), and the canary
    compares like with like: publishing passes at bf16's stated tolerance."""
    cfg = RecipeConfig(model="tiny", device="cpu", dtype="bfloat16")
    policy = HFPolicy("tiny", device="cpu", dtype="bfloat16")
    base = learner_base(cfg, policy)
    assert (base.device.type, base.dtype) == ("cpu", torch.bfloat16)
    learner = trainable_model(base.path, r=4, alpha=8, device=base.device, dtype=base.dtype)
    lora = [p for p in learner.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in lora)
    assert any(p.dtype == torch.bfloat16 for p in learner.parameters() if not p.requires_grad)
    for p in lora:
        p.data.normal_(0, 0.02)
    served = publish(policy, learner, base.tokenizer, tmp_path / "a", "a")
    assert served.active_adapter == "a" and canary_tolerance(torch.bfloat16) > canary_tolerance(torch.float32)


def test_non_finite_loss_gradient_or_weight_stops_the_step():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    with pytest.raises(NonFinite, match="step 7: the loss is nan"):
        optimizer_step(opt, [w], 1.0, math.nan, "step 7")
    w.grad = torch.tensor([1.0, math.inf, 0.0])
    with pytest.raises(NonFinite, match="gradient norm"):
        optimizer_step(opt, [w], 1.0, 0.5, "step 8")
    assert torch.equal(w.detach(), torch.ones(3))  # the optimizer did not move
    w.grad = torch.tensor([1e18, 0.0, 0.0])
    opt = torch.optim.SGD([w], lr=1e21)  # a finite gradient, a step past fp32's range
    with pytest.raises(NonFinite, match="step 9: a weight is not finite"):
        optimizer_step(opt, [w], 1e19, 0.5, "step 9")


def test_a_nan_canary_is_a_sync_error(tiny):
    """`abs(nan - x) > tol` is False: without an explicit check a NaN would pass."""
    with pytest.raises(SyncError, match="not finite"):
        verify_sync(tiny, tiny.active_adapter, [math.nan] * len(tiny.prompt_logprobs(CANARY)))


def test_a_diverging_run_stops_with_one_line_naming_the_step(tmp_path):
    r = cli("run", "recipe=score", "stage1_steps=1", "stage2_steps=1", "batch_tasks=4", "train_tasks=8",
            "eval_limit=2", "val_limit=2", "max_new_tokens=8", "lr=1e30", f"run_dir={tmp_path / 'r'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "error" in x]
    # the loss turns NaN, or the step's adapter does and verified sync refuses it: either way, named
    assert ("step 2: the loss is nan" in line or "'step-1'" in line or ("'step-2'" in line and "not finite" in line)) \
        and "resume=true" in line, line
    assert not (tmp_path / "r" / "summary.json").exists()


def test_sft_never_teaches_an_end_of_turn_after_a_cut_response(tiny):
    from selfevolve.training.learner import IGNORE, encode_chat

    conv = [{"role": "user", "content": "Q"}]
    full = encode_chat(tiny.tokenizer, conv + [{"role": "assistant", "content": "The answer is 5."}], "last")
    cut = encode_chat(tiny.tokenizer, conv + [{"role": "assistant", "content": "The answer is 5.", "unfinished": True}],
                      "last")
    taught = [[t for t, y in zip(ids, labels) if y != IGNORE] for ids, labels in (full, cut)]
    assert taught[0][:-1] == taught[1] and taught[0][-1] in tiny.tokenizer.all_special_ids


def test_gradient_checkpointing_gives_the_same_gradient():
    from selfevolve.training.learner import encode_chat, pad_batch, sft_loss

    tok = HFPolicy("tiny", device="cpu").tokenizer
    batch = pad_batch([encode_chat(tok, c, "last") for c in _convs(6)], tok.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = trainable_model("tiny", r=4, alpha=8, gradient_checkpointing=checkpointing)
        model.train()
        sft_loss(model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_chunked_output_layer_gives_the_same_logprobs_and_gradient(monkeypatch):
    """Above LOGITS_BUDGET the output layer runs in checkpointed chunks (no B×T×V logits);
    log-probs and gradients match the model's own logits, and under no_grad too."""
    from selfevolve.training import learner as training
    from selfevolve.training.learner import encode_chat, pad_batch, token_logprobs

    tok = HFPolicy("tiny", device="cpu").tokenizer
    batch = pad_batch([encode_chat(tok, c, "last") for c in _convs(6)], tok.pad_token_id)
    out = []
    for budget in (training.LOGITS_BUDGET, 3 * 353):  # whole batch; three positions of one row per chunk
        monkeypatch.setattr(training, "LOGITS_BUDGET", budget)
        torch.manual_seed(0)
        model = trainable_model("tiny", r=4, alpha=8)
        model.train()
        lp, mask = token_logprobs(model, batch)
        (-lp.sum()).backward()
        with torch.no_grad():
            frozen, _ = token_logprobs(model, batch)
        out.append((lp.detach(), frozen, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
    (lp0, frozen0, g0), (lp1, frozen1, g1) = out
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(frozen1, lp1, atol=1e-6)
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-5) and g0.abs().sum() > 0


def test_sft_trains_the_sampled_ids_when_the_policy_reported_them(tiny):
    from selfevolve.training.learner import IGNORE, answer_message, encode_turns
    from selfevolve.types import Turn

    conv = [{"role": "user", "content": "What is 2 + 3?"}]
    sampled = tiny.tokenizer(" The answer is 5.", add_special_tokens=False)["input_ids"]  # with the space the text lost
    turn = Turn(response="The answer is 5.", token_ids=sampled, finish_reason="stop")
    ((ids, labels, _),) = encode_turns(tiny.tokenizer, conv + [answer_message(turn)], last_only=True)
    taught = [t for t, y in zip(ids, labels) if y != IGNORE]
    assert taught[:-1] == sampled and taught[-1] in tiny.tokenizer.all_special_ids
    assert ids[: len(tiny.encode_prompts([conv])[0])] == tiny.encode_prompts([conv])[0]  # the prompt it was given
