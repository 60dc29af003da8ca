"""score — SCoRe: two-stage multi-turn RL that teaches the served model to correct itself.

    selfevolve run recipe=score seed=0

Kumar et al., "Training Language Models to Self-Correct via Reinforcement Learning" (arXiv
2409.12917). Each episode has two attempts: y1 ~ π(·|x), then, after the instruction
"There might be an error in the solution above because of lack of understanding of the
question. Please correct the error, if any, and rewrite the solution.", y2 ~ π(·|x, y1, I).
r ∈ {0, 1} is the verifier's score; π_ref is the base model (the adapter switched off).

    Stage I  (stage1_steps, Eq. 3):   max  E[ r(y2) ] − β2·KL(π(·|x) ‖ π_ref)
        the second attempt learns to fix; the first is held at the base model by the strong
        β2 (the paper's Eq. 3 has no KL on y2 in Stage I, and neither does this code).

    Stage II (stage2_steps, Eq. 4):   max  E[ r(y1) + r̂(y2) ] − β1·(KL₁ + KL₂),
                                      r̂(y2) = r(y2) + α·(r(y2) − r(y1))

Credit (`credit=`, `losses.attempt_credit`). Eq. 4 is an expectation over the joint draw of
(y1, y2), so its gradient credits y1 with its return-to-go r(y1) + r̂(y2) =
(1 − α)·r(y1) + (1 + α)·r(y2) and y2 with r̂(y2): `credit=trajectory`, the default. This is
what makes the bonus matter: α changes the direction of learning, rewarding first attempts
the second one fixes and penalising right first answers that get broken, a pressure on y1
that β1's KL holds at the base model. `credit=per_attempt` (y1 gets r(y1), y2 gets
r̂(y2)/(1 + α)) is potential-based shaping: the −α·r(y1) part is a constant given (x, y1),
so the expected gradient equals α = 0's and only the variance differs — with it the
`alpha=0` ablation is a fair, same-scale comparison, and α cannot change what is learned.
tests/test_losses.py checks both statements on an exact two-attempt bandit.

Estimator: on-policy REINFORCE, one gradient step per batch of `batch_tasks` fresh episodes,
each attempt's baseline the leave-one-out batch mean of its credit. Advantages keep the
paper's reward scale (r ∈ {0, 1}, bonus ±α) so β1 = 0.01 and β2 = 0.1 weigh against rewards
as in the paper; `scale_advantages=true` divides by the batch std instead (then β is relative
to unit-variance advantages). The KL penalty is the per-token k2 loss, whose expected
gradient is ∇KL(π ‖ π_ref) (`losses.kl_loss`; the k3 estimator as a loss would give the
gradient of KL(π_ref ‖ π)); the log shows k3's unbiased KL value.

Every step: rollouts through the selfevolve loop (`refine_batch`, temperature 1), rewards
from the run's verifier, every episode stored in the TraceStore (round = step, meta.stage,
policy_version = the adapter that sampled it), the update applied to a LoRA adapter, which
is saved to `run_dir/adapters/` and loaded into the served policy through verified sync, so
the next rollouts come from the updated model. Validation evaluation every `eval_every`
steps and at the end of each stage, with a warning when the model collapses (edit ratio near
zero, or `delta` ≤ 0 for `collapse_patience` Stage II evaluations in a row); the final model
is evaluated once on the test split (`summary.json`'s `after`).

Bounded staleness (`max_staleness=K`, default 0; not in the paper). Rollouts and adapter
loads run on one serving thread in submission order (`ServingThread`): step j's rollouts are
queued once update j − K is, so they are generated while the learner trains and are sampled
by an adapter exactly K updates old (fewer in the first K steps and after a resume, whose
in-flight batches come from the checkpoint's adapter: with K > 0 a resumed run differs from
the uninterrupted one there). Nothing staler is ever generated, so nothing is dropped; a
stale batch is importance-corrected: each policy-gradient token is weighted by
min(π/μ, is_cap), μ's log-probs being those its sampler reported, matched to the trained
tokens by identity (an attempt whose re-tokenised text differs from what was sampled stays
uncorrected and is counted in `unmatched_rows`); the KL term is not reweighted.
K = 0 waits for every rollout and load: the synchronous run, exactly
(tests/recipes/test_staleness.py).

Deviations from the paper: Stage I credits y1 with nothing. Eq. 3's exact gradient also
pushes y1 toward first attempts after which r(y2) is high (y1's score function times r(y2));
the paper's intent, and this code, is that Stage I trains the second attempt only, with y1
held at the base by β2's KL (tests/test_losses.py's bandit has the Stage II credit). The
tiny world's counts (`stage1_steps`, `stage2_steps`, `batch_tasks`) instead of the paper's;
LoRA instead of full fine-tuning; plain REINFORCE with the baseline above; the per-token KL
(above). Log-probabilities are of the sampled tokens in the context each attempt was sampled
in (`episode_batch`), re-tokenized text only where the policy does not report its tokens (an
OpenAI endpoint; `meta.tokens` on each trace says which); a response cut at `max_new_tokens`
is trained without an end of turn. Every step's two turns draw from seeds no other step uses
(`rollout_seed`). Ablations: `stage1_steps=0` (no Stage I), `alpha=0` (no bonus; compare
with `credit=per_attempt` for the variance-only effect).

From logged traffic (`data=traces.sqlite`): the logged prompts and references only. Both
attempts are re-sampled on-policy from the current adapter; logged answers (sampled by
other versions, without the second turn's instruction) are not trained on, so no stale
sample enters the policy gradient beyond what `max_staleness` allows.
"""

from __future__ import annotations

import random
import shutil
import time
from typing import TypedDict

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import Field, model_validator

from selfevolve import distributed
from selfevolve.build import learner_base, served_policy
from selfevolve.config import RecipeConfig
from selfevolve.data import tasks_for
from selfevolve.feedback.prompts import SCORE_INSTRUCTION
from selfevolve.loop import refine_batch
from selfevolve.losses import (
    CREDITS,
    attempt_credit,
    baseline_advantage,
    behaviour_logprobs,
    score_objective,
    truncated_is_weights,
)
from selfevolve.run import Run
from selfevolve.serving_thread import ServingThread
from selfevolve.sync import sampled_logprob_ratio, save_update, saved_update
from selfevolve.training import (
    EpisodeBatch,
    batch_slice,
    episode_batch,
    micro_batch_rows,
    micro_slices,
    optimizer_step,
    token_logprobs,
    trained_tokens,
)
from selfevolve.types import SamplingParams, Trace

DATA_PARALLEL = True  # nproc=N shards rollouts and batches over torchrun ranks (selfevolve/distributed.py)


class ScoreState(TypedDict):
    """What a checkpoint holds besides the learner's and the optimizer's state: a resumed run
    continues at `step`, serving `adapter` (kept on disk until a later checkpoint)."""

    step: int                   # updates done
    before: dict                # the evaluation before training
    history: list[dict]         # every evaluation since, with its step and stage
    adapter: str | None         # the adapter the served policy has at `step`


class ScoreConfig(RecipeConfig):
    recipe: str = "score"
    alpha: float = Field(10.0, ge=0, description="Stage II reward-shaping bonus α (0: the 'without shaping' ablation)")
    beta1: float = Field(0.01, ge=0, description="KL weight β1 on both attempts in Stage II")
    beta2: float = Field(0.1, ge=0, description="KL weight β2 on the first attempt in Stage I")
    temperature: float = Field(1.0, gt=0, description="rollout sampling temperature")
    instruction: str = Field(SCORE_INSTRUCTION, description="the second-turn instruction")
    stage1_steps: int = Field(40, ge=0, description="Stage I updates (0: the 'without Stage I' ablation)")
    stage2_steps: int = Field(120, ge=0, description="Stage II updates")
    batch_tasks: int = Field(64, ge=2, description="episodes (prompts) per update")
    train_split: str = Field("train", description="split the rollouts' prompts come from")
    train_tasks: int = Field(5000, ge=2, description="pool of training prompts")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate for the LoRA adapter")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    credit: str = Field("trajectory", pattern=f"^({'|'.join(CREDITS)})$",
                        description="Stage II credit: trajectory (y1 gets r(y1) + r̂(y2), the gradient of Eq. 4) | "
                        "per_attempt (y1 gets r(y1), y2 r̂(y2)/(1+α): α changes only the variance)")
    scale_advantages: bool = Field(False, description="divide each attempt's advantages by the batch std "
                                   "(false: the paper's reward scale, which β1/β2 are set against)")
    eval_every: int = Field(40, ge=1, description="validation evaluation every this many steps "
                            "(and at each stage's end)")
    checkpoint_every: int = Field(10, ge=1, description="steps between checkpoints")
    collapse_edit_ratio: float = Field(0.002, ge=0, description="warn when the validation edit ratio falls below this")
    collapse_patience: int = Field(2, ge=1, description="warn after this many Stage II evaluations with delta <= 0")
    logprob_check: float = Field(0.01, ge=0, description="warn when KL(server ‖ learner) estimated on the step's "
                                 "sampled tokens exceeds this (0: do not ask the server for log-probs)")
    max_staleness: int = Field(0, ge=0, description="rollouts may be sampled by an adapter this many updates old, "
                               "generated while the learner trains (0: synchronous)")
    is_cap: float = Field(2.0, gt=0, description="with max_staleness>0: truncation of the per-token importance "
                          "weights that correct stale rollouts")

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


def rollouts(policy, tasks, verifier, cfg: ScoreConfig, step: int, run: Run) -> tuple[list[Trace], float, float]:
    """Two attempts per task from the served policy, then both scored. Returns the traces
    and the generation / verification seconds. Under torchrun each rank runs its shard of
    the step's tasks, with its own seeds (`distributed.rank_seed`)."""
    t0 = time.perf_counter()
    traces = refine_batch(tasks, policy, None, None, max_turns=2, instruction=cfg.instruction, stop_when_correct=False,
                          sampling=SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                                  seed=distributed.rank_seed(rollout_seed(cfg, step)),
                                                  logprobs=cfg.logprob_check > 0),
                          recipe=cfg.recipe, run=run.name, round=step, meta={"stage": stage_of(step, cfg)})
    t1 = time.perf_counter()
    flat = [(t.task, turn) for t in traces for turn in t.turns]
    for (_, turn), fb in zip(flat, verifier.verify_batch([x for x, _ in flat], [turn.response for _, turn in flat])):
        turn.feedback = fb
    for t in traces:  # what the update will train on (HF and vLLM report their samples; an endpoint does not)
        t.meta["tokens"] = trained_tokens(t.turns)
    return traces, t1 - t0, time.perf_counter() - t1


def score_loss(learner, episode: EpisodeBatch, r1: torch.Tensor, r2: torch.Tensor, stage: int, cfg: ScoreConfig,
               backward: bool = False, served: list[tuple] | None = None,
               stale: bool = False, decode=None) -> tuple[torch.Tensor, dict]:
    """The stage's objective as a loss (to minimise), and its parts for the log.

    Advantages use the whole batch's rewards `r1`, `r2` (every rank's: under torchrun
    `episode` holds this rank's shard of the episodes, `distributed.shard`, and the logged
    parts are summed over the ranks); the forward passes (policy, and the reference
    under no_grad) run per micro-batch of `cfg.micro_batch_size` episodes, each term weighted
    by its share of the batch, so the sum is the full batch's loss. With `backward=True`
    each micro-batch's part is back-propagated at once (its graph freed: memory is one
    micro-batch's) and the returned loss is detached. `served`: each episode's (y1, y2)
    sampled (tokens, log-probabilities) as the server reported them, placed on the rows'
    tokens by identity (`losses.behaviour_logprobs`; `decode` compares tokens reported as
    text; `unmatched_rows` counts attempts whose tokens differ, left unweighted), for
    `logprob_ratio` and `logprob_kl`, the learner/server check on the sampled tokens
    (`sync.sampled_logprob_ratio`); with `stale` (an older adapter sampled the batch) they
    also weight the policy gradient (`losses.truncated_is_weights`, capped at `cfg.is_cap`;
    `is_weight` is their mean)."""
    if stage == 1:  # Eq. 3: only r(y2) is maximised; β2 holds y1, no KL on y2
        credit, betas = (torch.zeros_like(r1), r2), (cfg.beta2, 0.0)
    else:  # Eq. 4
        credit, betas = attempt_credit(r1, r2, cfg.alpha, cfg.credit), (cfg.beta1, cfg.beta1)
    adv = tuple(baseline_advantage(c, cfg.scale_advantages) for c in credit)
    batch, m1, m2, row_episode = episode
    first = distributed.bounds(len(r1))[0]  # this rank's first episode in the batch
    adv = tuple(a[first + row_episode] for a in adv)  # each row carries its episode's advantages
    device, n = next(learner.parameters()).device, len(r1)  # terms are normalised by episodes
    loss, sums, check, weights = 0.0, {}, [0.0, 0.0, 0, 0], [0.0, 0]
    for sl in micro_slices(len(row_episode), micro_batch_rows(learner, batch, cfg.micro_batch_size)):
        mb = {k: v.to(device) for k, v in batch_slice(batch, sl).items()}
        width = mb["input_ids"].shape[1] - 1
        logp, _ = token_logprobs(learner, mb)
        with torch.no_grad(), learner.disable_adapter():
            ref, _ = token_logprobs(learner, mb)
        masks = tuple(m[sl, :width].to(device) for m in (m1, m2))
        w = [None, None]
        for k, mask in enumerate(masks):
            if served is None:
                continue
            values, where, unmatched = behaviour_logprobs(mb["labels"][:, 1:], mask, [  # the sampler's log-probs,
                served[e][k] for e in row_episode[sl].tolist()], decode)                # on their own tokens
            check[3] += unmatched
            if stale:  # sampled by an older adapter: importance-weight its tokens to this one
                w[k] = truncated_is_weights(logp, values, where, cfg.is_cap)
                weights = [weights[0] + float((w[k] * mask).sum()), weights[1] + int(mask.sum())]
            check[:3] = [a + b for a, b in zip(check, sampled_logprob_ratio(logp, values, where))]
        part, stats = score_objective(logp, ref, masks, tuple(a[sl].to(device) for a in adv), betas, tuple(w),
                                      scale=(sl.stop - sl.start) / n)
        for name, values in stats._asdict().items():
            for k, v in enumerate(values, start=1):
                sums[f"{name}_t{k}"] = sums.get(f"{name}_t{k}", 0.0) + v
        if backward:
            part.backward()
            part = part.detach()
        loss = loss + part
    if backward:  # the whole batch's loss and parts (a sum of the ranks' shares)
        loss = torch.tensor(distributed.total(float(loss)))
        sums = {k: distributed.total(v) for k, v in sums.items()}
        check = [distributed.total(x) for x in check]
        weights = [distributed.total(x) for x in weights]
    parts = {k: round(v, 5) for k, v in sums.items()} | {"loss": round(float(loss.detach()), 5)}
    if weights[1]:
        parts["is_weight"] = round(weights[0] / weights[1], 5)
    if check[2]:
        parts |= {"logprob_ratio": round(check[0] / check[2], 5), "logprob_kl": round(check[1] / check[2], 6)}
    if served is not None:
        parts["unmatched_rows"] = int(check[3])
    return loss, parts


def train_step(learner, opt, traces: list[Trace], tokenizer, pad_id: int, stage: int, cfg: ScoreConfig,
               step: int, stale: bool = False) -> dict:
    """One update on the step's episodes (`traces`: the whole batch, on every rank; `stale`:
    sampled by an older adapter than the learner's). Each rank back-propagates its shard's
    share of the batch loss, the gradients are summed over the ranks, and every rank applies
    the same step. Returns the logged parts."""
    params = [p for p in learner.parameters() if p.requires_grad]
    r1 = torch.tensor([t.turns[0].score or 0.0 for t in traces])
    r2 = torch.tensor([t.turns[1].score or 0.0 for t in traces])
    mine = distributed.shard(traces)
    served = [tuple((turn.token_ids or turn.tokens, turn.logprobs) for turn in t.turns[:2])
              for t in mine] if cfg.logprob_check else None
    opt.zero_grad(set_to_none=True)
    loss, parts = score_loss(learner, episode_batch(mine, tokenizer, pad_id, cfg.instruction), r1, r2, stage, cfg,
                             backward=True, served=served, stale=stale, decode=tokenizer.decode)
    distributed.sum_grads(params)
    optimizer_step(opt, params, cfg.max_grad_norm, float(loss), f"step {step + 1}")
    return {"reward_t1": round(r1.mean().item(), 4), "reward_t2": round(r2.mean().item(), 4), **parts}


def check_logprob_ratio(cfg: ScoreConfig, parts: dict, step: int, run: Run) -> None:
    """The learner scores the tokens the server sampled, with the weights the server was sent:
    a KL between them above `logprob_check` means the server samples from another model (an
    adapter that never arrived, a stale version, a different dtype or template)."""
    if parts.get("logprob_kl", 0.0) > cfg.logprob_check:
        run.warn(step, f"KL(server ‖ learner) on the sampled tokens is {parts['logprob_kl']:.4f} (ratio "
                       f"{parts['logprob_ratio']:.3f}): the server samples from another model?")


def warn_collapse(cfg: ScoreConfig, history: list[dict], run: Run) -> None:
    """The paper's two failure modes: no edits at all, or edits that do not help."""
    last = history[-1]
    stage2 = [h for h in history if h["stage"] == 2]
    why = None
    if last["edit_ratio"] < cfg.collapse_edit_ratio:
        why = f"edit ratio {last['edit_ratio']} < {cfg.collapse_edit_ratio}: the second attempt copies the first"
    elif len(stage2) >= cfg.collapse_patience and all(h["delta"] <= 0 for h in stage2[-cfg.collapse_patience :]):
        why = f"delta <= 0 for {cfg.collapse_patience} Stage II evaluations: revisions do not help"
    if why:
        run.warn(last["step"], f"collapse? {why}")


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

    state = run.restore()
    if state is None:
        before = run.evaluate(policy, "before", test=True)
        state = ScoreState(step=0, before=before, history=[], adapter=None)
    else:
        set_peft_model_state_dict(learner, state["learner"])
        opt.load_state_dict(state["optimizer"])
        if state["adapter"]:
            policy = saved_update(state["adapter"]).serve(policy, f"step-{state['step']}")

    # The serving thread runs rollouts and adapter loads in submission order: step j's rollouts
    # are submitted once update j − max_staleness is queued, so they are sampled by it.
    serving, inflight, t_ckpt = ServingThread(policy), {}, 0.0
    with serving, run.progress("score", total=total, completed=state["step"]) as bar:
        for step in range(state["step"], total):
            stage = stage_of(step, cfg)
            for j in range(step, min(step + cfg.max_staleness + 1, total)):
                if j not in inflight:  # sampled by the last update queued: `step`'s
                    tasks = random.Random(f"{cfg.seed}:{j}").sample(pool, min(cfg.batch_tasks, len(pool)))
                    inflight[j] = (serving.submit(rollouts, distributed.shard(tasks), run.verifier, cfg, j, run), step)
            t0 = time.perf_counter()
            future, version = inflight.pop(step)
            mine, t_gen, t_ver = future.result()
            t_wait = time.perf_counter() - t0
            traces = distributed.gather(mine)  # every rank's episodes, in the batch's order
            run.store.append(traces)

            t0 = time.perf_counter()
            parts = train_step(learner, opt, traces, tokenizer, pad_id, stage, cfg, step, stale=step > version)
            check_logprob_ratio(cfg, parts, step + 1, run)
            t_train = time.perf_counter() - t0

            # Sync: rollouts submitted from now on come from this update.
            t0 = time.perf_counter()
            name = f"step-{step + 1}"
            path = run.dir / "adapters" / name
            loaded = serving.publish(save_update(learner, tokenizer, path), name,
                                     replaces=f"step-{step}" if state["adapter"] else None)
            if not cfg.max_staleness:
                loaded.result()  # nothing overlaps: the synchronous order
            if state["adapter"]:
                run.retire(state["adapter"])  # deleted once a checkpoint no longer refers to it
            state["adapter"] = str(path)
            t_sync = time.perf_counter() - t0

            overlap = {"staleness": step - version, "time_wait": round(t_wait, 3)} if cfg.max_staleness else {}
            run.log(step=step + 1, stage=stage, **parts, **overlap, time_generate=round(t_gen, 3),
                    time_verify=round(t_ver, 3), time_train=round(t_train, 3), time_sync=round(t_sync, 3),
                    time_checkpoint=round(t_ckpt, 3))
            t_ckpt = 0.0
            state["step"] = step + 1
            if state["step"] % cfg.eval_every == 0 or state["step"] in (cfg.stage1_steps, total):
                policy = serving.drain()  # rollouts in flight finish first; then nothing runs beside evaluation
                metrics = run.evaluate(policy, f"step-{state['step']}", round=state["step"])
                state["history"].append({"step": state["step"], "stage": stage, **metrics})
                warn_collapse(cfg, state["history"], run)
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == total or run.stop_requested:
                t0 = time.perf_counter()
                serving.drain()  # every queued load has read its adapter before retired ones are deleted
                run.checkpoint({**state, "learner": get_peft_model_state_dict(learner), "optimizer": opt.state_dict()})
                t_ckpt = time.perf_counter() - t0  # logged with the next step
            bar.advance()
        policy = serving.drain()

    final = run.dir / "adapters" / "final"
    if state["adapter"] and run.main:
        shutil.copytree(state["adapter"], final, dirs_exist_ok=True)
    after = run.evaluate(policy, "after", round=state["step"], test=True)  # the final model, no selection
    run.finish(before=state["before"], after=after, adapter="adapters/final", evaluations=state["history"])
