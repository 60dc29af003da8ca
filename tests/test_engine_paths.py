"""What only real engines and real checkpoints do, and what training must make of it: vLLM's
token ids end with the stop token; an OpenAI endpoint's tokens are text that may not
re-tokenise as sampled; real configs have dropout; a truncated y' never ended; ChatML writes
text after its stop token; a load long after the learner is gone must still be verified."""

from types import SimpleNamespace as NS

import pytest
import torch

from selfevolve.errors import SyncError
from selfevolve.policies import HFPolicy
from selfevolve.policies.vllm import turns_from_output
from selfevolve.recipes.score import ScoreConfig, score_loss
from selfevolve.recipes.spin import pair_rows
from selfevolve.training.learner import IGNORE, answer_message, encode_turns, episode_batch, trainable_model
from selfevolve.training.publish import CANARY_FILE, save_update, saved_update
from selfevolve.types import SamplingParams, Task, Trace, Turn

Q = "What is 2 + 3?"


def _labels(tok, row) -> list[int]:
    return [t for t in row[1] if t != IGNORE]


def test_a_vllm_output_with_its_stop_token_teaches_one_end_of_turn(tiny):
    tok = tiny.tokenizer
    body = tok("The answer is 5.", add_special_tokens=False)["input_ids"]
    stop = tok.eos_token_id
    out = NS(outputs=[NS(text="The answer is 5.", token_ids=body + [stop],  # as vLLM returns them
                         logprobs=[{t: NS(logprob=-0.1)} for t in body + [stop]], finish_reason="stop")])
    (turn,) = turns_from_output(out)
    (row,) = encode_turns(tok, [{"role": "user", "content": Q}, answer_message(turn)])
    assert _labels(tok, row).count(stop) == 1 and _labels(tok, row) == body + [stop]
    (text_row,) = encode_turns(tok, [{"role": "user", "content": Q}, {"role": "assistant", "content": turn.response}])
    assert row == text_row  # the same row as the text, re-tokenised
    # HFPolicy reports the stop token and its log-prob the same way
    (hf,) = tiny.generate([[{"role": "user", "content": Q}]], SamplingParams(max_new_tokens=40, logprobs=True))[0]
    assert hf.finish_reason == "stop" and hf.token_ids[-1] == stop and len(hf.logprobs) == len(hf.token_ids)


def test_generation_logprobs_are_the_models_own_without_holding_every_steps_logits(tiny):
    """The per-step recorder gives what a full teacher-forced pass gives, at temperature < 1 too
    (the warpers run after it)."""
    conv = [{"role": "user", "content": "What is 7 + 8 - 3?"}]
    (turn,) = tiny.generate([conv], SamplingParams(temperature=0.7, max_new_tokens=30, seed=3, logprobs=True))[0]
    prompt = tiny.encode_prompts([conv])[0]
    ids = torch.tensor([prompt + turn.token_ids])
    with torch.no_grad():
        full = torch.log_softmax(tiny.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    expected = full.gather(1, torch.tensor(turn.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(turn.logprobs), expected, atol=1e-4)


def _trace(first: Turn, second: Turn) -> Trace:
    return Trace(task=Task(id="t", prompt=Q, reference="5"), turns=[first, second])


def test_a_retokenised_row_gets_no_neighbours_logprobs_and_is_counted(tiny):
    """An endpoint reports its tokens as text; the learner re-tokenises the (stripped)
    response. Where the tokens differ — here the sampled leading space the text lost — the
    log-probs are not placed by position (each token would get its neighbour's), the row is
    left unweighted and counted; where they agree they are placed and checked."""
    tok = tiny.tokenizer
    learner = trainable_model("tiny", r=4, alpha=8)
    cfg = ScoreConfig(batch_tasks=2)

    def sampled(text: str, lp: float) -> Turn:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return Turn(response=text.strip(), tokens=[tok.decode([i]) for i in ids], logprobs=[lp] * len(ids),
                    feedback=None)

    same, shifted = sampled("The answer is 5.", -0.5), sampled(" The answer is 5.", -0.5)
    traces = [_trace(same, same), _trace(same, shifted)]
    served = [tuple((t.tokens, t.logprobs) for t in tr.turns) for tr in traces]
    r = torch.tensor([1.0, 0.0])
    _, parts = score_loss(learner, episode_batch(traces, tok, tiny.pad_id, cfg.instruction), r, r, 2, cfg,
                          served=served, decode=tok.decode)
    assert parts["unmatched_rows"] == 1 and parts["logprob_kl"] >= 0  # three attempts placed and checked
    _, none = score_loss(learner, episode_batch(traces[1:] * 2, tok, tiny.pad_id, cfg.instruction), r, r, 2, cfg,
                         served=served[1:] * 2, decode=tok.decode)
    assert none["unmatched_rows"] == 2 and none["logprob_kl"] >= 0
    shifted_only = [_trace(shifted, shifted)] * 2
    _, nothing = score_loss(learner, episode_batch(shifted_only, tok, tiny.pad_id, cfg.instruction), r, r, 2, cfg,
                            served=[(( shifted.tokens, shifted.logprobs),) * 2] * 2, decode=tok.decode)
    assert nothing["unmatched_rows"] == 4 and "logprob_kl" not in nothing  # nothing placed by position
    # sampled ids that do not re-tokenise from the text: one row per attempt, each matched
    ids = tok(" The answer is 5.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    split = Turn(response="The answer is 5.", token_ids=ids, logprobs=[-0.5] * len(ids), feedback=None)
    batch = episode_batch([_trace(split, split)] * 2, tok, tiny.pad_id, cfg.instruction)
    assert len(batch[0]["input_ids"]) == 4
    _, rows = score_loss(learner, batch, r, r, 2, cfg, served=[((ids, split.logprobs),) * 2] * 2)
    assert rows["unmatched_rows"] == 0 and "logprob_kl" in rows


def test_a_dropout_model_has_zero_kl_and_zero_gradient_at_step_zero(tiny, tmp_path):
    """A fresh adapter on a dropout-0.1 checkpoint, zero advantages: the policy is the
    reference, so the KL and the gradient are exactly 0 (with dropout in the learner they
    were 11.9 nats and a norm of 3.85)."""
    model = tiny.model.__class__.from_pretrained(tiny.path)
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
        setattr(model.config, key, 0.1)
    model.save_pretrained(tmp_path / "drop")
    tiny.tokenizer.save_pretrained(tmp_path / "drop")
    policy = HFPolicy(str(tmp_path / "drop"), device="cpu")
    tasks = [Task(id=str(i), prompt=f"What is {i} + 4 - 2?", reference=str(i + 2)) for i in range(4)]
    convs = [[{"role": "user", "content": t.prompt}] for t in tasks]
    first = policy.generate(convs, SamplingParams(temperature=1.0, max_new_tokens=20, seed=0))
    traces = [_trace(a[0], a[0]) for a in first]
    for tr, t in zip(traces, tasks):
        tr.task = t
    learner = trainable_model(tmp_path / "drop", r=4, alpha=8)
    learner.train()  # as the recipe runs it
    cfg = ScoreConfig(batch_tasks=4)
    r = torch.ones(4)  # equal rewards: every advantage is 0
    for stage in (1, 2):
        learner.zero_grad()
        _, parts = score_loss(learner, episode_batch(traces, policy.tokenizer, policy.pad_id, cfg.instruction), r, r,
                              stage, cfg, backward=True)
        grads = [p.grad for p in learner.parameters() if p.requires_grad and p.grad is not None]
        assert parts["kl_t1"] == 0.0 and parts["kl_t2"] == 0.0
        assert float(torch.stack([g.norm() for g in grads]).norm()) == 0.0


def test_a_truncated_opponent_sample_is_scored_without_an_end_of_turn(tiny):
    tok = tiny.tokenizer
    task = Task(id="q", prompt=Q)
    pairs = [{"task": task, "gold": "The answer is 5.", "self": "The answer is", "unfinished": True},
             {"task": task, "gold": "The answer is 5.", "self": "The answer is 6.", "unfinished": False}]
    (g, _), (cut, ended) = pair_rows(tok, pairs, "gold"), pair_rows(tok, pairs, "self")
    stop = tok.eos_token_id
    assert _labels(tok, g)[-1] == stop and _labels(tok, ended)[-1] == stop
    assert stop not in _labels(tok, cut) and tok.decode(_labels(tok, cut)) == "The answer is"


def _adapter(tmp_path, tok, name: str, shift: float):
    learner = trainable_model("tiny", r=4, alpha=8)
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.add_(shift)
    return learner, save_update(learner, tok, tmp_path / name)


class WrongWeights(HFPolicy):
    """A server that answers 200 to a load but serves other weights (a stale cache, a
    same-name reload that kept the old tensors)."""

    other: str = ""

    def load_adapter(self, path, name):
        super().load_adapter(self.other, name)


def test_a_resumed_or_selected_adapter_is_verified_when_loaded(tiny, tmp_path):
    _, good = _adapter(tmp_path, tiny.tokenizer, "iter-0", 0.02)
    _, other = _adapter(tmp_path, tiny.tokenizer, "iter-1", -0.03)
    assert (good.path / CANARY_FILE).is_file()
    policy = HFPolicy("tiny", device="cpu")
    saved_update(good.path).serve(policy, "iter-0-selected")  # what a resume / final selection runs
    assert policy.active_adapter == "iter-0-selected"
    wrong = WrongWeights("tiny", device="cpu")
    wrong.other = str(other.path)
    with pytest.raises(SyncError, match="canary"):
        saved_update(good.path).serve(wrong, "iter-0-selected")
    assert wrong.active_adapter is None  # rolled back: nothing unverified serves
    (good.path / CANARY_FILE).unlink()
    with pytest.raises(SyncError, match="cannot be verified"):
        saved_update(good.path)
