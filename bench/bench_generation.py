"""Generation throughput of the loop's first turn over 256 arith prompts, against raw
batched `model.generate` on the identical prompts and settings, and against a naive
one-prompt-at-a-time loop, in the same process. Greedy, max_new_tokens=64, batch 64.

Tokens are counted the same way for all three: generated tokens up to (not including) the
end token. Each path starts from the prompt text (the raw paths tokenize with the chat
template, as a user's loop must). Each measurement is repeated 5 times, interleaved, after
a warm-up; the table shows medians. The naive loop runs on the first 32 prompts (its
tokens/s does not depend on how many it runs).
"""

from __future__ import annotations

import statistics
import time

import torch

from selfevolve.data import arith
from selfevolve.loop import refine_batch
from selfevolve.policies import HFPolicy
from selfevolve.types import SamplingParams

N, BATCH, NEW, NAIVE_N = 256, 64, 64, 32


def _raw_generate(policy: HFPolicy, texts: list[str]) -> int:
    """What a user writes by hand: chat template, fixed-order batches, left padding, model.generate."""
    prompts = [_encode(policy, t) for t in texts]
    tokens = 0
    for i in range(0, len(prompts), BATCH):
        chunk = prompts[i:i + BATCH]
        width = max(map(len, chunk))
        ids = torch.tensor([[policy.pad_id] * (width - len(p)) + p for p in chunk])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
        with torch.no_grad():
            out = policy.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                        pad_token_id=policy.pad_id, eos_token_id=sorted(policy.eos_ids))
        for row in out[:, width:].tolist():
            tokens += next((k for k, t in enumerate(row) if t in policy.eos_ids), len(row))
    return tokens


def _naive(policy: HFPolicy, texts: list[str]) -> int:
    tokens = 0
    for text in texts:
        p = _encode(policy, text)
        with torch.no_grad():
            out = policy.model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                                                                               dtype=torch.long),
                                        max_new_tokens=NEW, do_sample=False, pad_token_id=policy.pad_id,
                                        eos_token_id=sorted(policy.eos_ids))
        row = out[0, len(p) :].tolist()
        tokens += next((k for k, t in enumerate(row) if t in policy.eos_ids), len(row))
    return tokens


def _encode(policy: HFPolicy, text: str) -> list[int]:
    ids = policy.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def timed(fn):
    t0 = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - t0


REPEATS = 5


def run() -> dict:
    torch.set_num_threads(2)
    policy = HFPolicy("tiny", device="cpu", batch_size=BATCH)
    tasks = arith.tasks("test", n=N)
    texts = [t.prompt for t in tasks]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    def loop_fn():
        return sum(len(t.turns[0].token_ids) for t in refine_batch(tasks, policy, max_turns=1, sampling=sampling))

    raw_fn = lambda: _raw_generate(policy, texts)  # noqa: E731
    naive_fn = lambda: _naive(policy, texts[:NAIVE_N])  # noqa: E731
    loop_fn(), raw_fn()  # warm-up
    runs = {"loop": [], "raw": [], "naive": []}
    for _ in range(REPEATS):
        for name, fn in (("loop", loop_fn), ("raw", raw_fn), ("naive", naive_fn)):
            runs[name].append(timed(fn))
    (loop_tok, loop_s), (raw_tok, raw_s), (naive_tok, naive_s) = (
        (r[0][0], statistics.median(s for _, s in r)) for r in (runs["loop"], runs["raw"], runs["naive"])
    )
    loop, raw, naive = loop_tok / loop_s, raw_tok / raw_s, naive_tok / naive_s
    return {
        "title": "Generation: loop first turn vs raw batched generate vs one prompt at a time",
        "doc": __doc__.strip(),
        "rows": [
            ("selfevolve loop, turn 1 (256 prompts)", f"{loop:,.0f} tokens/s", f"{loop_tok} tokens in {loop_s:.2f} s"),
            ("raw batched model.generate (256 prompts)", f"{raw:,.0f} tokens/s", f"{raw_tok} tokens in {raw_s:.2f} s"),
            (
                f"naive one-at-a-time ({NAIVE_N} prompts)",
                f"{naive:,.0f} tokens/s",
                f"{naive_tok} tokens in {naive_s:.2f} s",
            ),
        ],
        "ratios": [("loop / raw batched (target >= 0.95)", loop / raw), ("loop / naive (target >= 5)", loop / naive)],
    }
