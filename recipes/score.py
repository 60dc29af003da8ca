"""score — SCoRe: two-stage multi-turn RL that teaches the served model to correct itself.

    selfevolve run recipe=score seed=0

Kumar et al., "Training Language Models to Self-Correct via Reinforcement Learning" (arXiv
2409.12917). Each episode has two attempts: y1 ~ π(·|x), then, after the instruction I
("There might be an error in the solution above …"), y2 ~ π(·|x, y1, I). r ∈ {0, 1} is the
verifier's score; π_ref is the base model (the adapter switched off).

    Stage I  (stage1_steps, Eq. 3):   max  E[ r(y2) ] − β2·KL(π(·|x) ‖ π_ref)
    Stage II (stage2_steps, Eq. 4):   max  E[ r(y1) + r̂(y2) ] − β1·(KL₁ + KL₂),
                                      r̂(y2) = r(y2) + α·(r(y2) − r(y1))

Credit (`losses.attempt_credit`), as the paper states it (Appendix A.4): "In all of our
experiments, we used only the instantaneous reward in our policy gradient objective, which
is equivalent to returns with discount factor γ = 0." y1 is credited with r(y1), y2 with
r̂(y2) (`credit=instantaneous`, the default): α scales the second attempt's step, never y1's
direction. `credit=trajectory` (γ = 1, the return-to-go of Eq. 4's sum) credits y1 with
(1 − α)·r(y1) + (1 + α)·r(y2), which pushes y1 toward answers the second attempt fixes
(tests/training/test_losses.py, an exact bandit; its measured effect: docs/recipes.md).
On-policy REINFORCE (`losses.score_objective`), one step per batch of fresh episodes,
leave-one-out baselines, the paper's reward scale (β1 = 0.01, β2 = 0.1 weigh as there), the
per-token k2 KL loss (gradient ∇KL(π ‖ π_ref)). Every step: two attempts through the loop
(`refine_batch`, the `Instruction` turn policy, T = 1), both scored, every episode stored,
the update saved and loaded into the served policy through verified sync, validation every
`eval_every` steps and at each stage's end (warning on the paper's two collapses,
`protocol.collapse`), checkpoints and resume: `on_policy.on_policy_steps` runs those around
this file's rollouts and update. The final model is evaluated once on the test split.
docs/recipes.md has the results; docs/scaling.md `max_staleness=K` (step j sampled by update
j − K while the learner trains, importance-weighted by min(π/μ, is_cap); K = 0 is the
synchronous run, exactly).

Deviations from the paper: Stage I credits y1 with nothing (Eq. 3's exact gradient would
also push y1 toward first attempts after which r(y2) is high; β2's KL holds y1 instead); the
tiny world's step counts; LoRA; plain REINFORCE; the per-token KL. Log-probabilities are of
the sampled tokens in the context each attempt was sampled in (`learner.episode_batch`),
re-tokenized text only where the policy reports none (`meta.tokens` says which); a response
cut at `max_new_tokens` is trained without an end of turn. From logged traffic
(`data=traces.sqlite`) only the prompts and references are used: both attempts are
re-sampled on-policy. Ablations: `stage1_steps=0`, `alpha=0`. Beyond the paper: `y2_samples=K`
draws K second attempts after each first and baselines each within its group (PAG, arXiv
2506.10406: a fix and a copy compared on the same y1), y1 over the batch's first attempts
(`losses.attempt_advantages`).
"""

from __future__ import annotations

import random
import time
from collections import Counter

import torch
from pydantic import Field, model_validator

from selfevolve.build import learner_base, served_policy
from selfevolve.config import RecipeConfig
from selfevolve.data.sources import tasks_for
from selfevolve.evaluation.protocol import collapse
from selfevolve.feedback.prompts import SCORE_INSTRUCTION
from selfevolve.loop import conversation, refine_batch
from selfevolve.on_policy import on_policy_steps
from selfevolve.run import Run
from selfevolve.training import distributed
from selfevolve.training.learner import (
    EpisodeBatch,
    episode_batch,
    micro_batches,
    optimizer_step,
    token_logprobs,
    trained_tokens,
)
from selfevolve.training.losses import CREDITS, SampledCheck, attempt_advantages, attempt_credit, score_objective
from selfevolve.training.publish import server_mismatch
from selfevolve.turns import Instruction
from selfevolve.types import SamplingParams, Trace

DATA_PARALLEL = True  # nproc=N shards rollouts and batches over torchrun ranks (selfevolve/training/distributed.py)


class ScoreConfig(RecipeConfig):
    recipe: str = "score"
    alpha: float = Field(10.0, ge=0, description="Stage II reward-shaping bonus α (0: the 'without shaping' ablation)")
    beta1: float = Field(0.01, ge=0, description="KL weight β1 on both attempts in Stage II")
    beta2: float = Field(0.1, ge=0, description="KL weight β2 on the first attempt in Stage I")
    temperature: float = Field(1.0, gt=0, description="rollout sampling temperature")
    instruction: str = Field(SCORE_INSTRUCTION, description="the second-turn instruction")
    stage1_steps: int = Field(40, ge=0, description="Stage I updates (0: the 'without Stage I' ablation)")
    stage2_steps: int = Field(120, ge=0, description="Stage II updates")
    batch_tasks: int = Field(64, ge=2, description="prompts per update (each K episodes with y2_samples=K)")
    train_split: str = Field("train", description="split the rollouts' prompts come from")
    train_tasks: int = Field(5000, ge=2, description="pool of training prompts")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate for the LoRA adapter")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    credit: str = Field("instantaneous", pattern=f"^({'|'.join(CREDITS)})$",
                        description="Stage II credit: instantaneous (the paper's, γ = 0: y1 gets r(y1)) | "
                        "trajectory (γ = 1: y1 gets r(y1) + r̂(y2))")
    scale_advantages: bool = Field(False, description="divide advantages by the batch std (false: the paper's scale)")
    y2_samples: int = Field(1, ge=1, description="second attempts per first attempt, each baselined within its group "
                            "(turn-independent, as PAG; 1: one, baselined over the batch as the paper)")
    eval_every: int = Field(40, ge=1, description="validation evaluation every this many steps (and at stage ends)")
    checkpoint_every: int = Field(10, ge=1, description="steps between checkpoints")
    collapse_edit_ratio: float = Field(0.002, ge=0, description="warn when the validation edit ratio falls below this")
    collapse_patience: int = Field(2, ge=1, description="warn after this many Stage II evaluations with delta <= 0")
    logprob_check: float = Field(0.01, ge=0, description="warn above this KL(server ‖ learner) on the sampled "
                                 "tokens (0: do not ask the server for log-probs)")
    max_staleness: int = Field(0, ge=0, description="rollouts may come from an adapter this many updates old (0: sync)")
    is_cap: float = Field(2.0, gt=0, description="truncation of the importance weights on stale rollouts")

    @model_validator(mode="after")
    def _every_rank_has_episodes(self):
        if self.batch_tasks < self.nproc:
            raise ValueError(f"batch_tasks={self.batch_tasks} < nproc={self.nproc}: every rank needs an episode")
        if self.max_staleness and not self.logprob_check:
            raise ValueError("max_staleness>0 corrects stale rollouts with the log-probs their sampler reports, "
                             "which logprob_check=0 does not ask for")
        return self


def stage_of(step: int, cfg: ScoreConfig) -> int:
    return 1 if step < cfg.stage1_steps else 2


def rollout_seed(cfg: ScoreConfig, step: int) -> int:
    """The sampling seed of step `step`'s first turn; the loop adds 1 for the second, so
    steps are 2 apart and no two turns of the run share a seed.

    >>> c = ScoreConfig()
    >>> len({rollout_seed(c, s) + turn for s in range(100) for turn in (0, 1)})
    200
    """
    return 2 * (cfg.seed * 1_000_003 + step)


def rollouts(policy, tasks, verifier, cfg: ScoreConfig, step: int, run: Run) -> tuple[list[Trace], dict]:
    """Two attempts per task from the served policy, then both scored; the traces and the
    seconds spent generating and verifying. With `y2_samples=K`, K second attempts after each
    first: K episodes sharing y1 (scored once), `meta["group"]` the id of the one-turn episode
that sampled it (not stored itself). Under torchrun
    each rank runs its shard of the step's tasks, with its own seeds (`distributed.rank_seed`)."""
    t0 = time.perf_counter()
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                              seed=distributed.rank_seed(rollout_seed(cfg, step)), logprobs=cfg.logprob_check > 0)
    k, meta = cfg.y2_samples, {"stage": stage_of(step, cfg)}
    traces = refine_batch(tasks, policy, None, Instruction(cfg.instruction), 2 if k == 1 else 1, sampling,
                          recipe=cfg.recipe, run=run.name, round=step, meta=meta)
    # with K > 1, the second turn as the loop would sample it (its seed + 1), K times
    seconds = [] if k == 1 else policy.generate([conversation(t, [cfg.instruction]) for t in traces],
                                                sampling.model_copy(update={"n": k, "seed": sampling.seed + 1}))
    t1 = time.perf_counter()
    flat = [(t.task, turn) for t in traces for turn in t.turns] + [
        (t.task, y2) for t, outs in zip(traces, seconds) for y2 in outs]  # each attempt scored once
    for (_, turn), fb in zip(flat, verifier.verify_batch([x for x, _ in flat], [turn.response for _, turn in flat])):
        turn.feedback = fb
    if k > 1:
        now = time.time()
        traces = [Trace(task=t.task, turns=[t.turns[0].model_copy(deep=True), y2], policy_version=t.policy_version,
                        recipe=cfg.recipe, run=run.name, round=step, meta={**meta, "group": t.id}, finished=now)
                  for t, outs in zip(traces, seconds) for y2 in outs]
    for t in traces:  # what the update will train on (HF and vLLM report their samples; an endpoint does not)
        t.meta["tokens"] = trained_tokens(t.turns)
    return traces, {"generate": t1 - t0, "verify": time.perf_counter() - t1}


def score_loss(learner, episode: EpisodeBatch, r1: torch.Tensor, r2: torch.Tensor, stage: int, cfg: ScoreConfig,
               backward: bool = False, served: list[tuple] | None = None,
               stale: bool = False, decode=None, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The stage's objective as a loss (to minimise), and its parts for the log.

    Advantages (`losses.attempt_advantages`; `groups`: each episode's y1 where several
    share one) use the whole batch's rewards `r1`, `r2` (every rank's; `episode` is this
    rank's shard, `distributed.shard`). The policy and reference forwards run per micro-batch,
    each term weighted by its share of the batch; with `backward=True` each micro-batch is
    back-propagated at once (memory is one micro-batch's) and the parts are summed over ranks.
    `served`: each episode's (y1, y2) as the sampler reported them (tokens, log-probs), for
    the learner/server check and, when `stale`, the importance weights (`losses.SampledCheck`)."""
    if stage == 1:  # Eq. 3: only r(y2) is maximised; β2 holds y1, no KL on y2
        credit, betas = (torch.zeros_like(r1), r2), (cfg.beta2, 0.0)
    else:  # Eq. 4
        credit, betas = attempt_credit(r1, r2, cfg.alpha, cfg.credit), (cfg.beta1, cfg.beta1)
    batch, m1, m2, row_episode = episode
    first = distributed.bounds(len(r1))[0]  # this rank's first episode: each row gets its episode's advantages
    adv = tuple(a[first + row_episode] for a in attempt_advantages(credit, groups, cfg.scale_advantages))
    device, n = next(learner.parameters()).device, len(r1)  # terms are normalised by episodes
    check = SampledCheck(served, decode, cfg.is_cap if stale else None)
    loss, sums = 0.0, Counter()
    for sl, mb in micro_batches(learner, batch, cfg.micro_batch_size):
        width = mb["input_ids"].shape[1] - 1
        logp, _ = token_logprobs(learner, mb)
        with torch.no_grad(), learner.disable_adapter():
            ref, _ = token_logprobs(learner, mb)
        masks = tuple(m[sl, :width].to(device) for m in (m1, m2))
        weights = check.weights(logp, mb["labels"][:, 1:], masks, row_episode[sl].tolist())
        part, stats = score_objective(logp, ref, masks, tuple(a[sl].to(device) for a in adv), betas, weights,
                                      scale=(sl.stop - sl.start) / n)
        sums.update(stats.named())
        if backward:
            part.backward()
            part = part.detach()
        loss = loss + part
    if backward:  # the whole batch's loss and parts (a sum of the ranks' shares)
        loss = torch.tensor(distributed.total(float(loss)))
        sums = {k: distributed.total(v) for k, v in sums.items()}
    return loss, {k: round(v, 5) for k, v in sums.items()} | {"loss": round(float(loss.detach()), 5)} | check.parts(
        total=backward)


def train_step(learner, opt, traces: list[Trace], tokenizer, pad_id: int, stage: int, cfg: ScoreConfig,
               step: int, stale: bool = False) -> dict:
    """One update on the step's episodes (`traces`: the whole batch, on every rank; `stale`:
    sampled by an older adapter than the learner's). Each rank back-propagates its shard's
    share of the batch loss, the gradients are summed over the ranks, and every rank applies
    the same step. Returns the logged parts."""
    params = [p for p in learner.parameters() if p.requires_grad]
    r1 = torch.tensor([t.turns[0].score or 0.0 for t in traces])
    r2 = torch.tensor([t.turns[1].score or 0.0 for t in traces])
    index: dict[str, int] = {}  # each episode's first attempt, numbered
    groups = torch.tensor([index.setdefault(t.meta["group"], len(index)) for t in traces]) \
        if cfg.y2_samples > 1 else None
    mine = distributed.shard(traces)
    served = [tuple((turn.token_ids or turn.tokens, turn.logprobs) for turn in t.turns[:2])
              for t in mine] if cfg.logprob_check else None
    opt.zero_grad(set_to_none=True)
    loss, parts = score_loss(learner, episode_batch(mine, tokenizer, pad_id, cfg.instruction), r1, r2, stage, cfg,
                             backward=True, served=served, stale=stale, decode=tokenizer.decode, groups=groups)
    distributed.sum_grads(params)
    optimizer_step(opt, params, cfg.max_grad_norm, float(loss), f"step {step + 1}")
    return {"reward_t1": round(r1.mean().item(), 4), "reward_t2": round(r2.mean().item(), 4), **parts}


def main(cfg: ScoreConfig, run: Run) -> None:
    policy = served_policy(cfg)  # serves rollouts and evaluations
    base = learner_base(cfg, policy)  # the served model's weights, device and dtype
    tokenizer = base.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pool = tasks_for(cfg, cfg.train_split, cfg.train_tasks)
    learner = base.learner(cfg)
    learner.train()
    opt = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    total = cfg.stage1_steps + cfg.stage2_steps

    def sample(policy, step: int):  # on the serving thread
        tasks = random.Random(f"{cfg.seed}:{step}").sample(pool, min(cfg.batch_tasks, len(pool)))
        return rollouts(policy, distributed.shard(tasks), run.verifier, cfg, step, run)

    def update(step: int, traces: list[Trace], stale: bool) -> dict:
        stage = stage_of(step, cfg)
        parts = train_step(learner, opt, traces, tokenizer, pad_id, stage, cfg, step, stale=stale)
        if why := server_mismatch(parts, cfg.logprob_check):
            run.warn(step + 1, why)
        return {"stage": stage, **parts}

    def evaluated(step: int, metrics: dict, history: list[dict]) -> dict:
        entry = {"step": step, "stage": stage_of(step - 1, cfg), **metrics}
        if why := collapse(history + [entry], cfg.collapse_edit_ratio, cfg.collapse_patience):
            run.warn(step, f"collapse? {why}")
        return entry

    policy, state = on_policy_steps(
        run, policy, learner, opt, tokenizer, total, cfg.max_staleness, sample, update,
        evaluate_at=lambda s: s % cfg.eval_every == 0 or s in (cfg.stage1_steps, total), evaluated=evaluated,
        checkpoint_every=cfg.checkpoint_every, name="score")
    after = run.evaluate(policy, "after", round=state["step"], test=True)  # the final model, no selection
    run.finish(before=state["before"], after=after, adapter="adapters/final", evaluations=state["history"])
