"""pretrain — builds the bundled `tiny` model from nothing (docs/architecture.md, "The bundled tiny world").

    selfevolve run recipe=pretrain seed=0

Not a paper recipe: it makes the small causal LM that every other recipe improves, so the
whole project runs offline on 2 CPU cores. Objective: next-token cross-entropy on the
final assistant turn of each conversation of a synthetic chat corpus,

    L(θ) = − Σ_t log pθ(y_t | x, y_<t)      (x: everything before that turn).

The loss covers the last assistant message only: in a transcript the model learns the
second answer given a draft, not to write wrong drafts (its own first-turn errors come
from its weakness, as a real model's do).

The corpus (all built from `arith` *train* expressions; validation and test are never seen):
- single-turn answers in two styles, `direct` ("The answer is 73.") and `steps`
  ("47 + 38 = 85. 85 - 12 = 73. The answer is 73."), mixed by `p_direct`;
- two-turn transcripts (answer, SCoRe's correction instruction, second answer), so the
  model can take a second turn as an instruct model can. First answers are drafts with
  realistic slips (`p_draft_wrong`); second answers after a wrong draft are a step-by-step
  correction (`p_fix`), the same wrong answer again, or another wrong guess; after a right
  draft mostly the same answer (a few needless changes, `p_break`), or, `p_recheck` of the
  time (0 for the bundled `tiny`), the same answer re-derived step by step. This gives SCoRe
  both failure modes of the paper (no change, harmful change) to learn away. With
  `p_direct=1` the first answer is always direct and steps appear only in second turns: a
  fast answer first, the careful derivation only as a second look (docs/experiments.md, "A
  second look that re-derives"); `p_steps_prompt` (0 for the bundled `tiny`) adds questions
  asked step by step ("Work it out step by step: 7 + 8 - 3."), answered in steps, so the
  skill a second look uses is learned on more than the second turns.
- optionally (`p_critique`, 0 for the bundled `tiny`), critique transcripts in the format
  SELF and `critic=self` use: the critique prompt with a draft and a critique in the
  verifier's words ("The answer has no errors." / "Your answer is wrong: wrong answer
  15."), or a revision after such a critique. The verdict is a coin flip, independent of
  the draft: the model learns to *write* a critique, as an instruct model can, but not to
  *judge*. Without them the critique words are tokens the model never saw, whose
  embeddings a LoRA adapter does not train, so SELF cannot teach tiny to critique.
  `p_critique=0` draws exactly the corpus the bundled model was trained on.
- optionally (`p_equation`, 0 for the bundled `tiny`), `equations` conversations ("Find x:
  2 + x - 3 = 4."), answered only in the direct style; in their two-turn transcripts the
  second answer is, `p_fix` of the time, a check of the draft by substitution that corrects
  or confirms it (`equations.check_solution`: "Check x = 8 in 2 + x - 3 = 4: 2 + 8 - 3 =
  10 - 3 = 7, not 4. 7 - 4 = 3, so x = 8 - 3 = 5. The answer is 5."). Solving stays mental
  arithmetic run backwards; checking is the forward steps the model knows. Wrong drafts are
  `equations.wrong_guess`'s, at a uniform distance from the answer. `p_equation=0` draws
  exactly the bundled corpus too.

The tokenizer is byte-level BPE (any UTF-8 text encodes) trained on a sample of the corpus
with digits split one per token, plus chat special tokens. The model is a Llama
(`LlamaForCausalLM`: RMSNorm, RoPE, SwiGLU, tied embeddings, 4 heads of 32), the architecture
vLLM serves with runtime LoRA.
Everything is seeded: the same seed and thread count give the same weights. After the run,
copy `run_dir/model/*` to `selfevolve/tiny/` (or `selfevolve/tiny_look/`, README's "The tiny
world") to replace a bundled model.
"""

from __future__ import annotations

import math
import random
import time

import torch
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from selfevolve.config import RecipeConfig
from selfevolve.data import arith, equations
from selfevolve.feedback.prompts import (
    CRITIQUE,
    REVISE_WITH_CRITIQUE,
    SCORE_INSTRUCTION,
    VERIFIER_RIGHT,
    VERIFIER_WRONG,
)
from selfevolve.policies import HFPolicy
from selfevolve.run import Run
from selfevolve.training.learner import encode_chat, optimizer_step, pad_batch, sft_loss

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
STEPS_QUESTION = "Work it out step by step: {expression}."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class PretrainConfig(RecipeConfig):
    recipe: str = "pretrain"
    data: str = "arith"
    difficulties: list[int] = Field([1, 2, 2, 3],
                                    description="difficulty of each corpus problem, drawn uniformly from this list")
    p_direct: float = Field(0.6, ge=0, le=1, description="share of single-turn answers in the direct style")
    p_two_turn: float = Field(0.2, ge=0, le=1, description="share of two-turn correction transcripts")
    p_draft_wrong: float = Field(0.5, ge=0, le=1, description="share of transcript drafts with a slip")
    p_fix: float = Field(0.5, ge=0, le=1, description="after a wrong draft: share of step-by-step corrections")
    p_break: float = Field(0.1, ge=0, le=1,
                           description="after a right draft not re-derived: share of needless wrong changes")
    p_recheck: float = Field(0.0, ge=0, le=1, description="after a right draft: share of step-by-step re-derivations")
    p_steps_prompt: float = Field(0.0, ge=0, le=1, description="share of the non-equation examples asked step by step "
                                  f"({STEPS_QUESTION.format(expression='7 + 8 - 3')!r}), answered in steps")
    p_critique: float = Field(0.0, ge=0, le=1, description="share of critique transcripts (coin-flip verdicts)")
    p_equation: float = Field(0.0, ge=0, le=1, description="share of `equations` conversations (checked second turns)")
    vocab_size: int = Field(384, ge=300)
    num_hidden_layers: int = Field(4, ge=1, description="decoder layers")
    hidden_size: int = Field(128, ge=8, description="model width")
    num_attention_heads: int = Field(4, ge=1, description="attention heads (head size = hidden_size / heads; "
                                     "vLLM's CPU attention takes 32, 64, 80, 96, 112, 128, ...)")
    intermediate_size: int = Field(384, ge=8, description="SwiGLU MLP width")
    max_position_embeddings: int = Field(256, ge=16, description="longest sequence (RoPE positions)")
    steps: int = Field(4000, ge=1)
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    log_every: int = Field(25, ge=1, description="steps between metrics lines")


# --- corpus ------------------------------------------------------------------------------


def train_expression(rng: random.Random, cfg: PretrainConfig) -> tuple[list[int], list[str]]:
    d = rng.choice(cfg.difficulties)
    while True:
        nums, ops = arith.random_expression(rng, d)
        if arith.split_of(arith.render(nums, ops)) == "train":
            return nums, ops


def equation_example(rng: random.Random, cfg: PretrainConfig) -> list[dict[str, str]]:
    """An `equations` conversation: a direct answer, or a draft, SCoRe's instruction and a second
    answer that checks the draft (`p_fix`), repeats it, or (after a wrong draft, or `p_break`
    of the right ones) guesses another digit."""
    d = rng.choice(cfg.difficulties)
    while True:
        nums, ops, hidden = equations.random_problem(rng, d)
        if arith.split_of(arith.render(nums, ops)) == "train":
            break
    q = equations.question(equations.render(nums, ops, hidden))
    x = nums[hidden]
    if rng.random() >= cfg.p_two_turn:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": arith.final_line(x)}]
    wrong = rng.random() < cfg.p_draft_wrong
    guess = equations.wrong_guess(x, rng) if wrong else x
    r = rng.random()
    if r < cfg.p_fix:
        second = equations.check_solution(nums, ops, hidden, guess)
    else:  # of the rest, half guess again after a wrong draft, p_break after a right one
        guess_again = (r - cfg.p_fix) / (1 - cfg.p_fix) < (0.5 if wrong else cfg.p_break)
        second = arith.final_line(equations.wrong_guess(x, rng) if guess_again else guess)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": arith.final_line(guess)},
            {"role": "user", "content": SCORE_INSTRUCTION}, {"role": "assistant", "content": second}]


def corpus_example(rng: random.Random, cfg: PretrainConfig) -> list[dict[str, str]]:
    if cfg.p_equation and rng.random() < cfg.p_equation:
        return equation_example(rng, cfg)
    if cfg.p_steps_prompt and rng.random() < cfg.p_steps_prompt:  # no draw at 0: the bundled corpus stays
        nums, ops = train_expression(rng, cfg)
        return [{"role": "user", "content": STEPS_QUESTION.format(expression=arith.render(nums, ops))},
                {"role": "assistant", "content": arith.step_solution(nums, ops)}]
    nums, ops = train_expression(rng, cfg)
    q = arith.question(arith.render(nums, ops))
    ans = arith.evaluate(nums, ops)

    def any_solution() -> str:
        return arith.direct_solution(nums, ops) if rng.random() < cfg.p_direct else arith.step_solution(nums, ops)

    def wrong_solution() -> str:
        if rng.random() < cfg.p_direct:
            return arith.direct_solution(nums, ops, arith.wrong_answer(ans, rng))
        return arith.step_solution(nums, ops, slip_at=rng.randrange(len(ops)), rng=rng)

    def second_after(first: str, wrong: bool) -> str:
        if wrong:
            r = rng.random()
            return (
                arith.step_solution(nums, ops)
                if r < cfg.p_fix
                else first
                if r < (1 + cfg.p_fix) / 2
                else wrong_solution()
            )
        if cfg.p_recheck and rng.random() < cfg.p_recheck:  # no draw at 0: the bundled corpus stays as it was
            return arith.step_solution(nums, ops)
        return wrong_solution() if rng.random() < cfg.p_break else first

    r = rng.random()
    if r >= cfg.p_two_turn + cfg.p_critique:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": any_solution()}]
    wrong = rng.random() < cfg.p_draft_wrong
    first = wrong_solution() if wrong else any_solution()
    if r < cfg.p_two_turn:
        return [
            {"role": "user", "content": q},
            {"role": "assistant", "content": first},
            {"role": "user", "content": SCORE_INSTRUCTION},
            {"role": "assistant", "content": second_after(first, wrong)},
        ]
    # A critique with a coin-flip verdict, or (as often) a revision after a "wrong" critique.
    prompt = [{"role": "user", "content": CRITIQUE.format(question=q, answer=first, notes="")}]
    says_wrong = VERIFIER_WRONG.format(why=f"wrong answer {first.rsplit(' ', 1)[-1].rstrip('.')}")
    if rng.random() < 0.5:
        return prompt + [{"role": "assistant", "content": says_wrong if rng.random() < 0.5 else VERIFIER_RIGHT}]
    return [
        {"role": "user", "content": q},
        {"role": "assistant", "content": first},
        {"role": "user", "content": REVISE_WITH_CRITIQUE.format(critique=says_wrong)},
        {"role": "assistant", "content": second_after(first, wrong)},
    ]


def build_tokenizer(cfg: PretrainConfig) -> PreTrainedTokenizerFast:
    rng = random.Random(f"tokenizer:{cfg.seed}")
    texts = [m["content"] for _ in range(3000) for m in corpus_example(rng, cfg)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   model_max_length=cfg.max_position_embeddings)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: PretrainConfig, tokenizer) -> LlamaForCausalLM:
    """A Llama (RMSNorm, RoPE, SwiGLU, tied embeddings): the architecture vLLM serves with LoRA."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not a multiple of num_attention_heads="
                         f"{cfg.num_attention_heads}")
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                         max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, attention_dropout=0.0)
    return LlamaForCausalLM(config)


BUCKET = 4  # steps whose examples are drawn together and sorted by length (less padding)


def corpus_batch(cfg: PretrainConfig, tokenizer, step: int) -> dict[str, torch.Tensor]:
    """The batch of `step`, a pure function of (seed, step): resuming needs no data state.
    Examples of BUCKET consecutive steps are drawn together and sorted by length, so short
    answers are not padded to the length of two-turn transcripts."""
    group, slot = divmod(step, BUCKET)
    rng = random.Random(f"corpus:{cfg.seed}:{group}")
    rows = [encode_chat(tokenizer, corpus_example(rng, cfg), train_on="last") for _ in range(cfg.batch_size * BUCKET)]
    rows.sort(key=lambda r: len(r[0]))
    order = list(range(BUCKET))
    random.Random(f"order:{cfg.seed}:{group}").shuffle(order)
    k = order[slot]
    return pad_batch(rows[k * cfg.batch_size : (k + 1) * cfg.batch_size], tokenizer.pad_token_id)


def lr_at(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- the recipe --------------------------------------------------------------------------


def main(cfg: PretrainConfig, run: Run) -> None:
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay,
                                                                                   "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.95))

    state = run.restore()
    if state is None:
        model.eval()
        before = run.evaluate(HFPolicy(model, tokenizer=tokenizer), "before", test=True)
        state = {"step": 0, "before": before}
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    model.train()
    with run.progress("pretrain", total=cfg.steps, completed=state["step"]) as bar:
        for step in range(state["step"], cfg.steps):
            t0 = time.perf_counter()
            batch = corpus_batch(cfg, tokenizer, step)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss = sft_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step(opt, list(model.parameters()), 1.0, loss.item(), f"step {step + 1}")
            bar.advance()
            if (step + 1) % cfg.log_every == 0:
                run.log(step=step + 1, loss=round(loss.item(), 5), lr=lr_at(cfg, step),
                        tokens=int(batch["attention_mask"].sum()), time_train=round(time.perf_counter() - t0, 4))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or run.stop_requested:
                run.checkpoint({**state, "step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict()})

    model.eval()
    out = run.dir / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    after = run.evaluate(HFPolicy(str(out), device="cpu", batch_size=cfg.batch_size), "after", test=True)
    run.finish(before=state["before"], after=after)
