"""spin — SPIN: self-play fine-tuning against your own previous iterate.

    selfevolve run recipe=spin seed=0

Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models"
(arXiv 2401.01335). Given an SFT dataset of prompts x with gold responses y, iteration t:

    opponent:  y' ~ pθt(·|x)                                  (pθt: the previous iterate, frozen)
    train:     θ_{t+1} = argmin_θ  E[ −log σ( λ·[ (log pθ(y|x) − log pθt(y|x))
                                               − (log pθ(y'|x) − log pθt(y'|x)) ] ) ]

starting from θt (pθ0 is the base model). The trained model is the next opponent: it is
published to the served policy (verified sync), which generates the next y'. λ = 0.1 (the
paper's β). `mix_previous=true` also trains on iteration t−1's pairs, as the paper did
(their reference log-probabilities recomputed under the current opponent).

Every opponent sample is stored in the TraceStore with its gold response and whether it
formed a pair (meta.phase = "opponent", meta.gold, meta.pair); metrics.jsonl has, per
step, the loss, the implicit rewards λ·(log pθ − log pθt) of gold and self and their margin,
and the mean log-probability of gold and of self responses.

Deviations, for the tiny world on 2 CPU cores: `train_tasks=1000` prompts per iteration;
the gold response is the data's reference in `gold_template` (`auto`: "The answer is
{reference}." on arith and equations, the reference itself elsewhere — a user's answer
column is taken to hold whole responses; set the template for short answers); pairs
where y' equals y are dropped (their loss is the constant log 2, zero gradient); opponent
samples at temperature 1; LoRA (the adapter continues across iterations) instead of full
fine-tuning; 2 epochs per iteration. One AdamW runs the whole run: its moment estimates
carry across iterations (the paper's code re-creates its trainer, and with it the optimizer,
each iteration); θ_{t+1} starts from θ_t either way, and the carried moments only smooth
the step size at an iteration's start. It is part of the checkpoint, so resume is exact.
A y' cut at `max_new_tokens` is scored as it was sampled, without an end of turn (it never
ended; training it as finished would teach the model to stop there): docs/architecture.md.

From logged traffic (`data=traces.sqlite`, `sources.logged_tasks`): a logged answer that scored
1 — by the verifier or a user's `/v1/feedback` — is the prompt's gold y (the latest such),
else the reference in `gold_template`; prompts with neither are left out. y' is always fresh
from pθt, so the opponent side is on-policy however old the log; a logged gold from an older
version is only a target (the paper's SFT data is fixed, any age), so staleness needs no
correction (`since_version=` bounds it).
"""

from __future__ import annotations

import random
import time

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import Field

from selfevolve.build import learner_base, served_policy
from selfevolve.config import RecipeConfig
from selfevolve.data.sources import GENERATED, is_trace_store, tasks_for
from selfevolve.run import Run
from selfevolve.training import distributed
from selfevolve.training.learner import (
    encode_chat,
    micro_batch_rows,
    micro_slices,
    optimizer_step,
    pad_batch,
    token_logprobs,
)
from selfevolve.training.losses import spin_loss
from selfevolve.training.publish import publish, saved_update
from selfevolve.types import SamplingParams, Trace, task_messages

DATA_PARALLEL = True  # nproc=N shards rollouts and batches over torchrun ranks (selfevolve/training/distributed.py)


class SpinConfig(RecipeConfig):
    recipe: str = "spin"
    iterations: int = Field(3, ge=1, description="self-play iterations")
    lam: float = Field(0.1, gt=0, description="λ in the SPIN loss (the paper's beta)")
    mix_previous: bool = Field(True, description="also train on the previous iteration's pairs (the paper)")
    gold_template: str = Field("auto", description="gold response from the reference: auto = 'The answer is "
                               "{reference}.' on arith and equations, '{reference}' elsewhere; or a template with "
                               "{reference}")
    train_split: str = Field("train", description="split the SFT prompts come from")
    train_tasks: int = Field(1000, ge=1, description="prompts per iteration")
    temperature: float = Field(1.0, ge=0, description="opponent sampling temperature")
    epochs: int = Field(2, ge=1, description="passes over the pairs per iteration")
    lr: float = Field(3e-5, gt=0,
                      description="AdamW learning rate (higher rates collapse the gold likelihood: docs/recipes.md)")
    pair_batch_size: int = Field(32, ge=1, description="pairs per optimizer step")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")


def gold_answer(task):
    """The logged answer `gold` takes (a `LoggedAnswer`: the latest that scored 1), or None."""
    return next((a for a in reversed(task.meta.get("logged", [])) if a.score == 1.0), None)


def gold(task, cfg: SpinConfig) -> str | None:
    """The gold response: a logged answer that scored 1 (the latest, `gold_answer`), else the
    reference in `gold_template`; None when the task has neither."""
    logged = gold_answer(task)
    if logged is not None:
        return logged.response
    if task.reference is None:
        return None
    template = cfg.gold_template
    if template == "auto":
        template = "The answer is {reference}." if cfg.data in GENERATED else "{reference}"
    return template.format(reference=task.reference)


def opponent_samples(policy, tasks, cfg: SpinConfig, iteration: int, run: Run) -> list[Trace]:
    """y' from the current opponent for every prompt; stored with the gold response. Under
    torchrun each rank samples its shard of the prompts and every rank gets them all."""
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                              seed=distributed.rank_seed(cfg.seed * 1000 + iteration))
    tasks = distributed.shard(tasks)
    outs = policy.generate([task_messages(t) for t in tasks], sampling)
    traces = [
        Trace(
            task=t,
            turns=[o[0]],
            policy_version=policy.active_adapter,
            recipe=cfg.recipe,
            run=run.name,
            round=iteration,
            meta={"phase": "opponent", "gold": gold(t, cfg), "pair": o[0].response != gold(t, cfg)},
        )
        for t, o in zip(tasks, outs)
    ]
    traces = distributed.gather(traces)
    run.store.append(traces)
    return traces


def pair_rows(tokenizer, pairs: list[dict], which: str) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced rows of each pair's gold (`which="gold"`) or own (`"self"`) response: its
    tokens and its end token, except a y' cut at `max_new_tokens`, which never ended and is
    scored without one (`encode_chat`'s `unfinished`)."""
    return [encode_chat(tokenizer, [*task_messages(p["task"]),
                                    {"role": "assistant", "content": p[which],
                                     "unfinished": which == "self" and p.get("unfinished", False)}], "last")
            for p in pairs]


def sequence_logprobs(model, pad_id: int, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Σ log p(response | prompt) per row (`pair_rows`)."""
    lp, _ = token_logprobs(model, pad_batch(rows, pad_id, next(model.parameters()).device))
    return lp.sum(-1)


@torch.no_grad()
def opponent_logprobs(model, tokenizer, pad_id, pairs, batch_size: int = 64) -> list[tuple[float, float]]:
    """log pθt(y|x) and log pθt(y'|x) for every pair, computed once before the iteration trains
    (each rank scores its shard; every rank gets them all)."""
    model.eval()
    pairs, out = distributed.shard(pairs), []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        g = sequence_logprobs(model, pad_id, pair_rows(tokenizer, chunk, "gold"))
        s = sequence_logprobs(model, pad_id, pair_rows(tokenizer, chunk, "self"))
        out += list(zip(g.tolist(), s.tolist()))
    return distributed.gather(out)


def spin_step(learner, opt, tokenizer, pad_id, pairs: list[dict], refs: list[tuple[float, float]],
              cfg: SpinConfig, step: int) -> dict:
    """One optimizer step on a batch of pairs (every rank passes the whole batch): each rank
    back-propagates its shard's share of the batch's mean loss, in micro-batches; the
    gradients are summed over the ranks. Returns the step's loss and the per-pair values."""
    params = [p for p in learner.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    lo, hi = distributed.bounds(len(pairs))
    gold_rows, self_rows = (pair_rows(tokenizer, pairs[lo:hi], w) for w in ("gold", "self"))
    rows = micro_batch_rows(learner, pad_batch(gold_rows + self_rows, pad_id), cfg.micro_batch_size)
    loss, values = 0.0, []
    for sl in micro_slices(hi - lo, max(1, rows // 2)):  # a pair is two rows
        mb = list(range(lo, hi))[sl]
        g = sequence_logprobs(learner, pad_id, gold_rows[sl])
        s = sequence_logprobs(learner, pad_id, self_rows[sl])
        refs_g, refs_s = (torch.tensor([refs[j][k] for j in mb], device=g.device) for k in (0, 1))
        part, rg, rs = spin_loss(g, s, refs_g, refs_s, cfg.lam)
        (part * len(mb) / len(pairs)).backward()  # the batch mean, whatever the shard
        loss += part.item() * len(mb) / len(pairs)
        values += zip(g.tolist(), s.tolist(), rg.tolist(), rs.tolist())
    distributed.sum_grads(params)
    loss = distributed.total(loss)
    optimizer_step(opt, params, 1.0, loss, f"step {step + 1}")
    lg, ls, r_gold, r_self = torch.tensor(distributed.gather(values)).T
    return {"loss": round(loss, 5), "reward_gold": round(r_gold.mean().item(), 5),
            "reward_self": round(r_self.mean().item(), 5), "reward_margin": round((r_gold - r_self).mean().item(), 5),
            "logp_gold": round(lg.mean().item(), 4), "logp_self": round(ls.mean().item(), 4)}


def train_iteration(learner, opt, tokenizer, pad_id, pairs, cfg: SpinConfig, iteration: int, step: int, run: Run,
                    bar) -> dict:
    """Epochs of the SPIN loss over the pairs; one metrics line per step (`step` counts the
    optimizer steps of the whole run)."""
    refs = opponent_logprobs(learner, tokenizer, pad_id, pairs)
    learner.train()
    step_stats = []
    for epoch in range(cfg.epochs):
        order = list(range(len(pairs)))
        random.Random(f"{cfg.seed}:{iteration}:{epoch}").shuffle(order)
        for i in range(0, len(order), cfg.pair_batch_size):
            idx = order[i : i + cfg.pair_batch_size]
            values = spin_step(learner, opt, tokenizer, pad_id, [pairs[j] for j in idx], [refs[j] for j in idx], cfg,
                               step)
            step += 1
            stats = {"step": step, "iteration": iteration, "epoch": epoch, **values}
            run.log(**stats)
            step_stats.append(stats)
            bar.advance()
    learner.eval()
    last = step_stats[-max(1, len(step_stats) // cfg.epochs) :]
    return {"steps": step, **{k: round(sum(s[k] for s in last) / len(last), 5) for k in ("loss", "reward_margin",
                                                                                         "logp_gold", "logp_self")}}


def main(cfg: SpinConfig, run: Run) -> None:
    policy = served_policy(cfg)
    base = learner_base(cfg, policy)  # the served model's weights, device and dtype
    tokenizer = base.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tasks = tasks_for(cfg, cfg.train_split, cfg.train_tasks, unscored_train=True)
    if is_trace_store(cfg.data):  # logged prompts without a reference or an accepted answer have no gold
        tasks = [t for t in tasks if gold(t, cfg) is not None]
    missing = next((t for t in tasks if gold(t, cfg) is None), None)
    if missing is not None:
        from selfevolve.errors import UserError

        raise UserError(f"SPIN needs a gold response for every prompt; task {missing.id} has no {cfg.answer_field!r}")
    run.trained_on(a.trace_id for a in map(gold_answer, tasks) if a is not None)
    learner = base.learner(cfg)
    opt = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    state = run.restore()
    if state is None:
        state = {"iteration": 0, "steps": 0, "before": run.evaluate(policy, "before", test=True), "history": [],
                 "adapter": None}
    else:
        set_peft_model_state_dict(learner, state["learner"])
        opt.load_state_dict(state["optimizer"])
        if state["adapter"]:
            with run.rng_kept():  # as the uninterrupted run's RNG was at its checkpoint
                policy = saved_update(state["adapter"]).serve(policy, f"iter-{state['iteration'] - 1}")

    for it in range(state["iteration"], cfg.iterations):
        t0 = time.perf_counter()
        samples = opponent_samples(policy, tasks, cfg, it, run)
        rounds = [it - 1, it] if cfg.mix_previous and it > 0 else [it]
        pairs = distributed.from_main(lambda: [  # rank 0's store holds every round, a resumed run's too
            {"task": t.task, "gold": t.meta["gold"], "self": t.turns[0].response,
             "unfinished": t.turns[0].finish_reason == "length"}
            for r in rounds
            for t in run.store.query(round=r, meta={"phase": "opponent", "pair": True})
        ])
        t_sample = time.perf_counter() - t0
        t0 = time.perf_counter()
        with run.progress(f"spin iteration {it}", total=cfg.epochs * -(-len(pairs) // cfg.pair_batch_size)) as bar:
            stats = (train_iteration(learner, opt, tokenizer, pad_id, pairs, cfg, it, state["steps"], run,
                                     bar) if pairs else {})
        state["steps"] = stats.pop("steps", state["steps"])
        t_train = time.perf_counter() - t0

        path = run.dir / "adapters" / f"iter-{it}"
        policy = publish(
            policy,
            learner,
            tokenizer,
            path,
            f"iter-{it}",  # the next opponent
            replaces=f"iter-{it - 1}" if state["adapter"] else None,
        )
        metrics = run.evaluate(policy, f"iteration-{it}", round=it)
        n_pairs = sum(t.meta["pair"] for t in samples)
        run.log(
            iteration=it,
            pairs=len(pairs),
            new_pairs=n_pairs,
            same_as_gold=len(samples) - n_pairs,
            time_sample=round(t_sample, 2),
            time_train=round(t_train, 2),
            **{f"last_{k}": v for k, v in stats.items()},
        )
        state["history"].append({"iteration": it, "pairs": len(pairs), **stats, **metrics})
        state.update(iteration=it + 1, adapter=str(path))
        run.checkpoint({**state, "learner": get_peft_model_state_dict(learner), "optimizer": opt.state_dict()})

    after = run.evaluate(policy, "after", round=cfg.iterations - 1, test=True)  # the final model, no selection
    run.finish(before=state["before"], after=after, adapter=f"adapters/iter-{cfg.iterations - 1}",
               iterations=state["history"])
