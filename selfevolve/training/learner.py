"""Training building blocks shared by the recipes: chat encoding with assistant-only labels,
batching, per-token log-probabilities, SFT, the LoRA learner and a checked optimizer step.
Small functions, no trainer class (docs/architecture.md: recipes may repeat a few lines
rather than inherit).

Memory scales with the model, not the vocabulary: log-probabilities of the chosen tokens are
computed one sequence at a time from the logits (never a B×T×V log-softmax in fp32), and
every recipe can split a batch into micro-batches whose gradients accumulate
(`micro_slices`), with batch-wide normalisation so the update equals the full batch's.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import NamedTuple

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from selfevolve.errors import NonFinite
from selfevolve.models import release_freed_memory, resolve_model_path
from selfevolve.training import distributed
from selfevolve.types import Conversation, task_messages

IGNORE = -100


def encode_chat(tokenizer, messages: Conversation, train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are IGNORE except on the tokens the
    model should learn to write: every assistant message (`train_on="assistant"`) or only
    the last one (`"last"`). An assistant message marked `"unfinished": True` (cut at the
    generation budget) is taught without the template's end of turn, which the model never
    produced.

    The template is rendered as text for each prefix (cheap) to find where each assistant
    message starts and ends; the full text is tokenized once and tokens are labelled by
    their character offsets. Works for any chat template whose renderings of prefixes are
    prefixes of the full rendering (the bundled model's and the common HF ones)."""
    def render(msgs, gen=False):
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen) if msgs else ""

    text = render(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and (train_on == "assistant" or i == last):
            lo, hi = render(messages[:i], gen=True), render(messages[: i + 1])
            if not (text.startswith(hi) and hi.startswith(lo)):
                raise ValueError("chat template is not prefix-stable; cannot locate assistant tokens")
            end = len(hi)
            if m.get("unfinished") and m["content"] and hi.find(m["content"], len(lo)) >= 0:
                end = hi.find(m["content"], len(lo)) + len(m["content"])
            spans.append((len(lo), end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(lo <= start < hi for lo, hi in spans) else IGNORE
              for t, (start, _) in zip(ids, enc["offset_mapping"])]
    stops, span_of = set(tokenizer.all_special_ids), None
    for j, (t, (start, _)) in enumerate(zip(ids, enc["offset_mapping"])):  # nothing after a message's stop token:
        here = next((s for s in spans if s[0] <= start < s[1]), None)      # the template's text after it (ChatML's
        if here is not None and here == span_of:                            # newline) is not the model's to write
            labels[j] = IGNORE
        elif here is not None and t in stops:
            span_of = here
    return ids, labels


def encode_turns(tokenizer, messages: list[dict], last_only: bool = False
                 ) -> list[tuple[list[int], list[int], list[int]]]:
    """Rows (input_ids, labels, attempt) that teach every assistant message exactly as the
    policy produced it: the context is what the policy was given at generation time — the
    template's rendering of the messages before it with the generation prompt, tokenized as
    a policy tokenizes a prompt — then the message's sampled `token_ids` (else its text,
    tokenized), then the template's end of turn up to its stop token, unless the message is
    `unfinished` (cut at the budget: an end of turn the model never produced is not taught).
    `attempt` is k on the tokens of the k-th assistant message, 0 elsewhere. Sampled ids end
    with the stop token when the sampler reports it (vLLM, HFPolicy): where the template's end
    of turn writes that token it is taught once, not twice; else the sampled stop ends the
    turn and the template's closing text is context.

    Attempts share one row when the earlier row is a token prefix of the later (prefix-stable
    templates, round-tripping text): one forward pass then scores both, exactly. A template
    that rewrites history (Qwen3's drops <think> from earlier turns) gives a row per attempt.
    `last_only`: teach only the last assistant message (SFT); earlier ones are context."""
    def render(msgs, gen):
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen) if msgs else ""

    def tok(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    stops = set(tokenizer.all_special_ids)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    rows, k = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        k += 1
        if last_only and i != last:
            continue
        lo, hi = render(messages[:i], True), render(messages[: i + 1], False)
        # an empty response (the stop token sampled first) sits right after the generation prompt
        at = (hi.find(m["content"], len(lo)) if m["content"] else len(lo)) if hi.startswith(lo) else -1
        if at < 0:
            raise ValueError("the chat template does not render an assistant message after its generation prompt")
        prompt, pre = tok(lo), tok(hi[len(lo):at])
        body = list(m.get("token_ids") or tok(m["content"]))
        close = [] if m.get("unfinished") else tok(hi[at + len(m["content"]):])
        end = next((j + 1 for j, t in enumerate(close) if t in stops), len(close))  # up to the stop token
        if body and body[-1] in stops:  # the sampler reported its stop token (vLLM, HFPolicy):
            if body[-1] in close[:end]:  # the template writes the same end of turn, taught once
                body.pop()
            else:                        # the turn ended at its own stop token: the rest is context
                end = 0
        context = prompt + pre
        ids = context + body + close
        labels = [IGNORE] * len(context) + body + close[:end] + [IGNORE] * (len(close) - end)
        attempt = [0] * len(context) + [k] * (len(body) + end) + [0] * (len(close) - end)
        if rows and ids[: len(rows[-1][0])] == rows[-1][0]:  # the previous row is this one's prefix
            prev_ids, prev_labels, prev_attempt = rows.pop()
            n = len(prev_ids)
            labels, attempt = prev_labels + labels[n:], prev_attempt + attempt[n:]
        rows.append((ids, labels, attempt))
    return rows


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) rows into tensors for teacher-forced training."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def answer_message(turn) -> dict:
    """A sampled Turn as the assistant message a recipe trains on (`encode_turns`): its text,
    the sampled token ids where the policy reported them, and, when it was cut at the
    budget, `unfinished` (no end of turn is taught after it)."""
    return {"role": "assistant", "content": turn.response, "token_ids": turn.token_ids,
            "unfinished": turn.finish_reason == "length"}


def trained_tokens(turns) -> str:
    """What `encode_turns` trains these turns on, for the trace: "sampled" ids, or text
    "retokenized" (a policy that does not report its tokens, such as an OpenAI endpoint)."""
    return "sampled" if all(t.token_ids is not None for t in turns) else "retokenized"


class EpisodeBatch(NamedTuple):
    """SCoRe's teacher-forced rows (`episode_batch`); the masks are aligned with
    `token_logprobs` (position t scores token t+1)."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: [rows, width]
    first: torch.Tensor             # [rows, width - 1] bool: y1's tokens
    second: torch.Tensor            # [rows, width - 1] bool: y2's tokens
    episode: torch.Tensor           # [rows] the episode (trace) each row belongs to


def episode_batch(traces: list, tokenizer, pad_id: int, instruction: str) -> EpisodeBatch:
    """SCoRe's teacher-forced rows of whole episodes (x, y1, I, y2) built by `encode_turns`
    from the sampled tokens, the masks of the first and the second attempt's tokens, and the
    episode of each row: one row scores both attempts where that is exact, else (a template
    that rewrites history, a response that does not re-tokenize to its samples) one row per
    attempt, each in the context the policy had when it sampled."""
    rows, episode = [], []
    for e, t in enumerate(traces):
        msgs = [*task_messages(t.task), answer_message(t.turns[0]),
                {"role": "user", "content": instruction}, answer_message(t.turns[1])]
        for row in encode_turns(tokenizer, msgs):
            rows.append(row)
            episode.append(e)
    batch = pad_batch([(ids, labels) for ids, labels, _ in rows], pad_id)
    which = torch.zeros_like(batch["labels"])
    for i, (_, _, attempt) in enumerate(rows):
        which[i, : len(attempt)] = torch.tensor(attempt)
    which = which[:, 1:]  # aligned with token_logprobs: position t scores token t+1
    return EpisodeBatch(batch, which == 1, which == 2, torch.tensor(episode))


# A micro-batch's saved activations when `micro_batch_size` is not set, in elements of
# rows × width × layers × hidden (what gradient checkpointing keeps: each layer's input;
# without it a layer keeps about ACTIVATIONS_PER_LAYER times that). 2^26 is 256 MiB in fp32:
# 3,800 tokens of SmolLM2-135M (30 × 576), 670 of a 7B (28 × 3,584), a whole tiny batch.
ACTIVATION_BUDGET = 2**26
ACTIVATIONS_PER_LAYER = 16  # measured on SmolLM2-135M without checkpointing: ~1 MB a token
# Logits alive at once (rows × positions × vocabulary) where token_logprobs applies the output
# layer in chunks: 2^25 is 128 MiB in fp32, a 680-token chunk of SmolLM2's 49k vocabulary.
LOGITS_BUDGET = 2**25


def checkpointed(model) -> bool:
    """Whether gradient checkpointing is on in `model` (some module recomputes in backward)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def micro_batch_rows(model, batch: dict[str, torch.Tensor], micro_batch_size: int | None) -> int:
    """Rows per forward/backward pass: `micro_batch_size` when set, else as many of the
    batch's rows as keep a pass's saved activations within ACTIVATION_BUDGET (at least one),
    so a step's memory is bounded by the model and the longest row, not by the batch (the
    logits are bounded separately, in token_logprobs).

    >>> from types import SimpleNamespace as NS
    >>> def model(layers, hidden, checkpointing=True):
    ...     return NS(config=NS(num_hidden_layers=layers, hidden_size=hidden),
    ...               modules=lambda: [NS(gradient_checkpointing=checkpointing)])
    >>> b = {"input_ids": torch.zeros(64, 300)}  # 64 rows of 300 tokens
    >>> micro_batch_rows(model(30, 576), b, None), micro_batch_rows(model(30, 576, False), b, None)  # SmolLM2
    (12, 1)
    >>> micro_batch_rows(model(4, 128), b, None), micro_batch_rows(model(30, 576), b, 8)  # tiny; set by the user
    (64, 8)
    """
    if micro_batch_size is not None:
        return micro_batch_size
    rows, width = batch["input_ids"].shape
    per_token = model.config.num_hidden_layers * model.config.hidden_size
    per_token *= 1 if checkpointed(model) else ACTIVATIONS_PER_LAYER
    return max(1, min(rows, ACTIVATION_BUDGET // max(1, width * per_token)))


def micro_slices(n: int, micro_batch_size: int | None) -> list[slice]:
    """Slices that cover range(n) in micro-batches (one slice when micro_batch_size is None).

    >>> micro_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    size = micro_batch_size or max(n, 1)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def disable_dropout(model) -> None:
    """Dropout off in every module (TRL's `disable_dropout`). A learner whose policy, reference
    (the adapter switched off), opponent and importance ratios are scored with different
    dropout masks sees KL and gradients where there is no difference: a fresh adapter on a
    dropout-0.1 model would log KL 11.9 nats per sequence at step 0 instead of 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style functional dropout
            module.attention_dropout = 0.0


def batch_slice(batch: dict[str, torch.Tensor], sl: slice) -> dict[str, torch.Tensor]:
    """Rows `sl` of a right-padded batch, cut to their own longest row (less padding to run)."""
    width = int(batch["attention_mask"][sl].sum(-1).max())
    return {k: v[sl, :width] for k, v in batch.items()}


def micro_batches(model, batch: dict[str, torch.Tensor], micro_batch_size: int | None):
    """(rows, that micro-batch on the model's device) over the batch, `micro_batch_rows` rows at a time."""
    device = next(model.parameters()).device
    for sl in micro_slices(len(batch["input_ids"]), micro_batch_rows(model, batch, micro_batch_size)):
        yield sl, {k: v.to(device) for k, v in batch_slice(batch, sl).items()}


def selective_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in fp32, one sequence at a time:
    logit[target] − logsumexp(logits). Peak extra memory is one sequence's T×V in fp32
    instead of the batch's (TRL's selective_log_softmax does the same).

    >>> x = torch.randn(2, 3, 5); t = torch.randint(0, 5, (2, 3))
    >>> torch.allclose(selective_logprobs(x, t), torch.log_softmax(x, -1).gather(2, t[..., None])[..., 0])
    True
    """
    rows = []
    for row, tgt in zip(logits, target):
        row = row.float()
        rows.append(row.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(row, -1))
    return torch.stack(rows)


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under `model`, and the mask of labelled tokens.
    Shapes (B, T-1): position t scores token t+1. Where the batch's logits would exceed
    LOGITS_BUDGET, the output layer runs on the last hidden states in checkpointed chunks of
    positions, so no more than a chunk's logits exist at once, in the forward or the backward
    (the idea of Liger's fused linear cross-entropy); the values are the same."""
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    target = target.clamp(min=0)
    head = model.get_output_embeddings()
    rows, width = target.shape
    if rows * width * head.weight.shape[0] <= LOGITS_BUDGET or _transforms_logits(model.config):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return selective_logprobs(logits, target) * mask, mask
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]  # (B, T-1, H): after the final norm, before the output layer
    step = max(1, LOGITS_BUDGET // (rows * head.weight.shape[0]))
    parts = [checkpoint(lambda h, t: selective_logprobs(head(h), t), hidden[:, i:i + step], target[:, i:i + step],
                        use_reentrant=False) for i in range(0, width, step)]
    return torch.cat(parts, 1) * mask, mask


def _transforms_logits(config) -> bool:
    """Whether the model changes its output layer's logits (Gemma-2's soft-capping, Cohere's
    scale): then token_logprobs takes the model's own logits, unchunked."""
    return (bool(getattr(config, "final_logit_softcapping", None))
            or getattr(config, "logit_scale", 1.0) not in (None, 1.0))


def sft_loss(model, batch: dict[str, torch.Tensor], tokens: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled tokens, divided by `tokens` (default:
    this batch's count, the mean; a micro-batch passes its whole batch's count)."""
    lp, mask = token_logprobs(model, batch)
    return -lp.sum() / (tokens if tokens is not None else mask.sum().clamp(min=1))


def optimizer_step(opt, params: list[torch.Tensor], max_grad_norm: float, loss: float, where: str) -> float:
    """Clip the gradients and step, after `backward` ran; returns the gradient norm. Raises
    NonFinite naming `where` when the loss or the gradient norm is not finite (before the
    optimizer moves) or when a weight is not finite after the step (a broken adapter is never
    published)."""
    if not math.isfinite(loss):
        raise NonFinite(f"{where}: the loss is {loss}; stopped before the update")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not math.isfinite(norm):
        raise NonFinite(f"{where}: the gradient norm is {norm}; stopped before the update")
    opt.step()
    if not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
        raise NonFinite(f"{where}: a weight is not finite after the update; it was not published")
    return norm


def lora_model(path, r: int = 16, alpha: int = 32, target_modules: list[str] | str = "all-linear", device="cpu",
               trainable_tokens: list[int] | None = None, dtype: torch.dtype = torch.float32):
    """A fresh LoRA adapter (peft) on the base weights at `path`: what "fine-tune from the
    base model" means for a recipe that resets each iteration. The base is loaded in `dtype`
    (the served model's); peft keeps the adapter's own weights in fp32. `target_modules`:
    every linear layer of the blocks by default (peft's "all-linear": the attention and MLP
    projections, not the output head), as QLoRA found LoRA needs to match full fine-tuning;
    vLLM serves LoRA on all of them. `trainable_tokens`: token ids whose embedding rows the adapter also
    trains (peft trainable tokens, tied output rows included), for words the base model
    never learned; LoRA alone cannot move an embedding."""
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    # GPT-2-style Conv1D layers store weights transposed; say so (peft would warn, then do it)
    conv1d = any(isinstance(m, Conv1D) for m in base.modules())
    kw = dict(r=r, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
              trainable_token_indices=trainable_tokens or None, fan_in_fan_out=conv1d)
    return get_peft_model(base, LoraConfig(target_modules=target_modules, **kw))


def trainable_model(base: str | Path, lora: bool = True, r: int = 16, alpha: int = 32, init_from: str | None = None,
                    device: str | torch.device = "cpu", trainable_tokens: list[int] | None = None,
                    dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = True):
    """The model a training step updates: a fresh LoRA adapter on the base weights ("fine-tune
    from the base model"), optionally starting from a saved adapter (`init_from`, to continue);
    with lora=False all weights (in `dtype`), from `init_from` (a full model directory) or the
    base. `trainable_tokens`: see `lora_model`. `gradient_checkpointing` recomputes
    activations in the backward pass: less memory for about a third more compute. Dropout is
    off (`disable_dropout`), for SFT as for RL: every recipe's numbers are of the model as
    served."""
    base = resolve_model_path(str(base))
    if not lora:
        model = AutoModelForCausalLM.from_pretrained(init_from or base, dtype=dtype).to(device)
    else:
        model = lora_model(base, r=r, alpha=alpha, device=device, trainable_tokens=trainable_tokens, dtype=dtype)
        if init_from:
            set_peft_model_state_dict(model, load_peft_weights(init_from, device=str(device)))
    disable_dropout(model)  # the learner is scored as it is served (HFPolicy runs in eval mode)
    release_freed_memory(model, torch.device(device))
    distributed.broadcast_params(model)  # under torchrun every rank starts from rank 0's adapter
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5.2's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a KV cache is of no use in a training forward
        if lora:
            model.enable_input_require_grads()
    return model


def sft(model, tokenizer, conversations: list, epochs: int = 1, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
        bar=None, token_lr: float | None = None, micro_batch_size: int | None = None) -> dict[str, float]:
    """Supervised fine-tuning on the last assistant message of each conversation (AdamW,
    seeded order, one optimizer step per batch of `batch_size`, accumulated over micro-batches
    of `micro_batch_size`; under torchrun each rank runs its shard of every batch, normalised
    by the whole batch's token count, and the gradients are summed: `selfevolve.training.distributed`).
    Returns mean loss and token count. `token_lr`: the learning rate
    of trainable embedding rows (`lora_model(trainable_tokens=)`), which start far from where
    they must go and need a larger step than the adapter."""
    rows = [encode_turns(tokenizer, c, last_only=True)[0][:2] for c in conversations]  # as generated
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    tokens = [p for n, p in named if "trainable_tokens" in n]
    groups = [{"params": [p for n, p in named if "trainable_tokens" not in n]}]
    if tokens:
        groups.append({"params": tokens, "lr": token_lr or lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    model.train()
    losses, tokens = [], 0
    for epoch in range(epochs):
        order = list(range(len(rows)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in range(0, len(order), batch_size):
            full = [rows[j] for j in order[i : i + batch_size]]
            n_tokens = sum(y != IGNORE for _, labels in full for y in labels[1:])  # the batch's, on every rank
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            mine = distributed.shard(full)  # this rank's rows (all of them with one process)
            if mine:
                batch = pad_batch(mine, pad, device)
                for _, mb in micro_batches(model, batch, micro_batch_size):
                    part = sft_loss(model, mb, tokens=max(n_tokens, 1))
                    part.backward()
                    loss += part.item()
            distributed.sum_grads(params)
            loss = distributed.total(loss)
            optimizer_step(opt, params, 1.0, loss, f"sft step {len(losses) + 1}")
            losses.append(loss)
            tokens += sum(y != IGNORE for _, labels in full for y in labels)
            if bar is not None:
                bar.advance()
    model.eval()
    return {"sft_loss": sum(losses) / max(1, len(losses)), "sft_tokens": tokens, "sft_steps": len(losses)}


@torch.no_grad()
def text_token_logprobs(model, tokenizer, text: str | list[int], top: int = 0) \
        -> tuple[list[int], list[float | None], list[dict[int, float] | None]]:
    """Token ids of `text` (special tokens as the tokenizer adds them, as a completions
    endpoint does; token ids are taken as they are), log p(t_i | t_<i) for each (None for the
    first), and the `top` most likely tokens at each position with theirs ({} when top=0;
    None for the first)."""
    was_training = model.training
    model.eval()
    ids = text if isinstance(text, list) else tokenizer(text)["input_ids"]
    ids = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # one unpadded row
    lps = selective_logprobs(logits[:, :-1], ids[:, 1:])[0].tolist()
    tops: list[dict[int, float] | None] = [None] + [{} for _ in lps]
    if top:
        values, indices = torch.log_softmax(logits[0, :-1].float(), -1).topk(top, -1)
        tops = [None] + [dict(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    model.train(was_training)
    return ids[0].tolist(), [None] + lps, tops
