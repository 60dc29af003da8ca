"""rest_em — ReST-EM: sample, keep what the verifier accepts, fine-tune from the base model.

    selfevolve run recipe=rest_em seed=0

Singh et al., "Beyond Human Data: Scaling Self-Training for Problem-Solving with Language
Models" (arXiv 2312.06585). Expectation-maximisation with a binary reward r ∈ {0, 1}:

    E-step:  D_t = { (x, y) : y ~ p_{θ_{t-1}}(·|x) at temperature 1, r(x, y) = 1 },
             at most `max_per_task` distinct y per x
    M-step:  θ_t = argmax_θ  Σ_{(x,y) ∈ D_t} log p_θ(y | x),   starting from the *base* θ_0

Each iteration samples from the latest model, fine-tunes a fresh LoRA adapter on the
base model (`reset_each_iteration=true`, as the paper; `false` continues from the last
adapter), loads it into the served policy, and evaluates on the validation tasks. The paper
saw later iterations overfit, so the run keeps the best iteration by *validation* `acc_t1`
and says which it was; that iteration alone is evaluated on the test tasks, once, and is
`summary.json`'s `after` (selecting on the test tasks would bias `after` upward).

Deviations from the paper, for the tiny world on 2 CPU cores: `num_samples=4` samples per
task (paper: 32 on MATH), `max_per_task=2` (paper: 10), `train_tasks=1000` prompts per
iteration, LoRA instead of full fine-tuning (`lora=false` trains all weights), a fixed
number of SFT epochs rather than the paper's step budget.

From logged traffic (`data=runs/serve/traces.sqlite`, `sources.logged_tasks`): answers the
server logged that scored 1 — by the verifier or by a user's `/v1/feedback` — join the
E-step's kept set before fresh samples (same `max_per_task`, distinct responses), trained on
their sampled token ids; fresh samples are drawn only for tasks with a reference or tests
(the verifier needs one). A logged answer may come from an older version than θ_{t-1}: ReST-EM's
M-step is supervised on verified answers and needs no importance correction, so staleness
only widens the E-step's distribution (a deviation; `since_version=` bounds it).
"""

from __future__ import annotations

import time

from pydantic import Field

from selfevolve.build import learner_base, served_policy
from selfevolve.config import RecipeConfig
from selfevolve.data.sources import logged_answers, tasks_for, without_logs
from selfevolve.run import Run
from selfevolve.training import distributed
from selfevolve.training.learner import answer_message, sft, trained_tokens
from selfevolve.training.publish import publish, saved_update
from selfevolve.types import SamplingParams, Trace, task_messages

DATA_PARALLEL = True  # nproc=N shards rollouts and batches over torchrun ranks (selfevolve/training/distributed.py)


class RestEMConfig(RecipeConfig):
    recipe: str = "rest_em"
    iterations: int = Field(3, ge=1, description="outer EM iterations")
    train_split: str = Field("train", description="split sampled in the E-step")
    train_tasks: int = Field(1000, ge=1, description="prompts sampled per iteration")
    num_samples: int = Field(4, ge=1, description="samples per prompt (E-step)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (E-step)")
    max_per_task: int = Field(2, ge=1, description="kept correct samples per prompt at most")
    reset_each_iteration: bool = Field(True, description="M-step from the base model (paper) or continue")
    lora: bool = Field(True, description="train a LoRA adapter (false: all weights)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    epochs: int = Field(2, ge=1, description="SFT epochs over the kept set")
    lr: float = Field(1e-3, gt=0, description="SFT learning rate (AdamW)")
    sft_batch_size: int = Field(32, ge=1, description="SFT batch size")
    start_adapter: str | None = Field(None, description="an adapter saved by a run: sampled from first (the M-step "
                                      "still trains from the base); what an evolve round gets, its served version")


def e_step(policy, tasks, verifier, cfg: RestEMConfig, iteration: int, run: Run) -> list[Trace]:
    """Sample, verify, keep up to max_per_task distinct correct answers per task; store all.
    Under torchrun each rank samples its shard of the tasks and every rank gets them all."""
    tasks = distributed.shard(tasks)
    sampled = [t for t in tasks if "logged" not in t.meta or t.reference is not None or t.tests]
    convs = [task_messages(t) for t in sampled]
    sampling = SamplingParams(temperature=cfg.temperature, n=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                              seed=distributed.rank_seed(cfg.seed * 1000 + iteration))
    samples = policy.generate(convs, sampling) if convs else []
    flat = [(t, turn) for t, turns in zip(sampled, samples) for turn in turns]
    feedback = verifier.verify_batch([t for t, _ in flat], [turn.response for _, turn in flat]) if flat else []
    logged = logged_answers(tasks, score=1.0)  # first: a user's verdict is the strongest signal there is
    flat = logged + flat
    feedback = [turn.feedback for _, turn in logged] + list(feedback)
    traces, kept_per_task = [], {}
    for (task, turn), fb in zip(flat, feedback):
        turn.feedback = fb
        seen = kept_per_task.setdefault(task.id, set())
        keep = fb.score == 1.0 and len(seen) < cfg.max_per_task and turn.response not in seen
        if keep:
            seen.add(turn.response)
        traces.append(Trace(task=without_logs(task), turns=[turn], policy_version=policy.active_adapter,
                            recipe=cfg.recipe, run=run.name, round=iteration,
                            meta={"phase": "e_step", "kept": keep, "tokens": trained_tokens([turn])}))
    traces = distributed.gather(traces)
    run.store.append(traces)
    kept = [t for t in traces if t.meta["kept"]]
    run.trained_on(t.turns[0].feedback.details["trace"] for t in kept if "trace" in t.turns[0].feedback.details)
    return kept


def main(cfg: RestEMConfig, run: Run) -> None:
    policy = served_policy(cfg)
    base = learner_base(cfg, policy)  # the served model's weights, device and dtype
    tokenizer = base.tokenizer
    verifier = run.verifier
    tasks = tasks_for(cfg, cfg.train_split, cfg.train_tasks, unscored_train=True)

    state = run.restore()
    if state is None:
        state = {"iteration": 0, "before": run.evaluate(policy, "before", test=True), "history": [], "adapter": None}
    elif state["adapter"]:
        with run.rng_kept():  # as the uninterrupted run's RNG was at its checkpoint
            policy = saved_update(state["adapter"], cfg.lora).serve(policy, f"iter-{state['iteration'] - 1}")

    for it in range(state["iteration"], cfg.iterations):
        t0 = time.perf_counter()
        kept = e_step(policy, tasks, verifier, cfg, it, run)
        t_sample = time.perf_counter() - t0

        continue_from = None if cfg.reset_each_iteration else state["adapter"]
        model = base.learner(cfg, lora=cfg.lora, init_from=continue_from)
        convs = [[*task_messages(t.task), answer_message(t.turns[-1])] for t in kept]
        t1 = time.perf_counter()
        steps = cfg.epochs * -(-len(convs) // cfg.sft_batch_size)
        with run.progress(f"sft iteration {it}", total=steps) as bar:
            stats = (sft(model, tokenizer, convs, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.sft_batch_size,
                         seed=cfg.seed + it, bar=bar, micro_batch_size=cfg.micro_batch_size) if convs else {})
        t_train = time.perf_counter() - t1

        # Sync: save the update, serve it, verify the served policy is the learner.
        path = run.dir / "adapters" / f"iter-{it}"
        policy = publish(policy, model, tokenizer, path, f"iter-{it}", lora=cfg.lora,
                         replaces=f"iter-{it - 1}" if state["adapter"] else None)

        metrics = run.evaluate(policy, f"iteration-{it}", round=it)
        kept_n = len(kept)
        total = len(tasks) * cfg.num_samples
        run.log(iteration=it, kept=kept_n, rejected=total - kept_n, tasks_with_kept=len({t.task.id for t in kept}),
                time_sample=round(t_sample, 2), time_train=round(t_train, 2), **stats)
        state["history"].append({"iteration": it, "kept": kept_n, **metrics})
        state.update(iteration=it + 1, adapter=str(path))
        run.checkpoint(state)

    run.finish_selected(policy, state["before"], state["history"], lora=cfg.lora)
