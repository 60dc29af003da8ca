"""Training building blocks shared by the recipes: chat encoding with assistant-only labels,
batching, per-token log-probabilities, one SFT step. Small functions, no trainer class
(docs/architecture.md: recipes may repeat a few lines rather than inherit).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .models import resolve_model_path
from .types import Conversation

IGNORE = -100


def encode_chat(tokenizer, messages: Conversation, train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are IGNORE except on the tokens the
    model should learn to write: every assistant message (`train_on="assistant"`) or only
    the last one (`"last"`).

    The template is rendered as text for each prefix (cheap) to find where each assistant
    message starts and ends; the full text is tokenized once and tokens are labelled by
    their character offsets. Works for any chat template whose renderings of prefixes are
    prefixes of the full rendering (the bundled model's and the common HF ones)."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    text = render(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and (train_on == "assistant" or i == last):
            lo, hi = render(messages[:i], gen=True), render(messages[: i + 1])
            if not (text.startswith(hi) and hi.startswith(lo)):
                raise ValueError("chat template is not prefix-stable; cannot locate assistant tokens")
            spans.append((len(lo), len(hi)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(lo <= start < hi for lo, hi in spans) else IGNORE
              for t, (start, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


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


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under `model`, and the mask of labelled tokens.
    Shapes (B, T-1): position t scores token t+1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    lp = torch.gather(F.log_softmax(logits, dim=-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens."""
    lp, mask = token_logprobs(model, batch)
    return -lp.sum() / mask.sum().clamp(min=1)


def lora_model(path, r: int = 16, alpha: int = 32, target_modules: list[str] | str | None = None, device="cpu",
               trainable_tokens: list[int] | None = None):
    """A fresh LoRA adapter (peft) on the base weights at `path`: what "fine-tune from the
    base model" means for a recipe that resets each iteration. `target_modules=None` lets
    peft pick the attention/MLP projections it knows for the architecture, falling back to
    all linear layers. `trainable_tokens`: token ids whose embedding rows the adapter also
    trains (peft trainable tokens, tied output rows included), for words the base model
    never learned; LoRA alone cannot move an embedding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path).to(device)
    kw = dict(
        r=r, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM", trainable_token_indices=trainable_tokens or None
    )
    try:
        return get_peft_model(base, LoraConfig(target_modules=target_modules, **kw))
    except ValueError:  # peft has no default modules for this architecture
        return get_peft_model(base, LoraConfig(target_modules="all-linear", **kw))


def sft(
    model,
    tokenizer,
    conversations: list,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    bar=None,
    token_lr: float | None = None,
) -> dict[str, float]:
    """Supervised fine-tuning on the last assistant message of each conversation (AdamW,
    seeded order, one optimizer step per batch). Returns mean loss and token count.
    `token_lr`: the learning rate of trainable embedding rows (`lora_model(trainable_tokens=)`),
    which start far from where they must go and need a larger step than the adapter."""
    import random

    rows = [encode_chat(tokenizer, c, train_on="last") for c in conversations]
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
            batch = pad_batch([rows[j] for j in order[i : i + batch_size]], pad, device)
            loss = sft_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            tokens += int((batch["labels"] != IGNORE).sum())
            if bar is not None:
                bar.advance()
    model.eval()
    return {"sft_loss": sum(losses) / max(1, len(losses)), "sft_tokens": tokens, "sft_steps": len(losses)}


@torch.no_grad()
def text_token_logprobs(model, tokenizer, text: str) -> tuple[list[int], list[float | None]]:
    """Token ids of `text` (special tokens as the tokenizer adds them, as a completions
    endpoint does) and log p(t_i | t_<i) for each (None for the first)."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits.float()
    lps = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None]).squeeze(1).tolist()
    model.train(was_training)
    return ids[0].tolist(), [None] + lps


def trainable_model(
    base: str | Path,
    lora: bool = True,
    r: int = 16,
    alpha: int = 32,
    init_from: str | None = None,
    device: str = "cpu",
    trainable_tokens: list[int] | None = None,
):
    """The model a training step updates: a fresh LoRA adapter on the base weights ("fine-tune
    from the base model"), optionally starting from a saved adapter (`init_from`, to continue);
    with lora=False all weights, from `init_from` (a full model directory) or the base.
    `trainable_tokens`: see `lora_model`."""
    base = resolve_model_path(str(base))
    if not lora:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(init_from or base).to(device)
    model = lora_model(base, r=r, alpha=alpha, device=device, trainable_tokens=trainable_tokens)
    if init_from:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(init_from, device=str(device)))
    return model
