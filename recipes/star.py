"""star — STaR: learn from your own correct rationales, and rationalise the failures.

    selfevolve run recipe=star seed=0

Zelikman et al., "STaR: Bootstrapping Reasoning With Reasoning" (arXiv 2203.14465). Each
outer iteration n, with M_{n-1} the latest model and M_0 the base:

    generate:     (r̂, ŷ) ~ M_{n-1}(x)                          for every training prompt x
    keep:         D_n   = { (x, r̂, ŷ) : ŷ = y }
    rationalise:  (r̂ʰ, ŷʰ) ~ M_{n-1}(x ⊕ hint(y))             for every x with ŷ ≠ y
                  Dʰ_n  = { (x, r̂ʰ, ŷʰ) : ŷʰ = y }              hint removed: trained on x alone
    fine-tune:    M_n   = SFT(M_0, D_n ∪ Dʰ_n)                  from the base model, every iteration

and stop early when validation accuracy plateaus. The best iteration by validation `acc_t1`
is evaluated once on the test tasks: that is `summary.json`'s `after`. `rationalize=false` is the paper's
"STaR without rationalisation" ablation.

A rationalised example must teach the model to reach y from x alone, so (1) the training
example is built from the task's own prompt, never the hinted one, and (2) a rationale that
reproduces the hint is rejected (`reproduces_hint`: it names the hint, copies the hint's own
words, or copies a long reference such as a code task's canonical solution): it reached y by
reading it, not by reasoning. Every sample is stored with `meta.outcome` = kept / rationalised / rejected, and
the M-step reads its data back from the TraceStore.

Deviations from the paper, for the tiny world on 2 CPU cores: sampling at temperature 1
(the paper decodes few-shot prompted GPT-J; the tiny model needs exploration to find
rationales it does not already produce greedily), `train_tasks=2000` prompts per iteration,
LoRA instead of full fine-tuning (`lora=false` trains all weights), a fixed number of SFT
epochs instead of the paper's growing step budget, and the hint is one sentence after the
question (`feedback/prompts.py: STAR_HINT`) rather than few-shot exemplars with hints.

From logged traffic (`data=traces.sqlite`, `sources.logged_tasks`): every scored logged answer
enters the generate step as a sample of its own (`phase: logged`): one that scored 1 — by the
verifier or a user's `/v1/feedback` — is kept, one that failed is rationalised like a fresh
failure when its task has a reference (the hint needs y); the prompts a verifier can score
are sampled afresh as above. A logged answer may come from an older version than M_{n-1}:
STaR's M-step is supervised on correct rationales and restarts from M_0, so staleness only
widens where D_n's rationales come from (as ReST-EM's; `since_version=` bounds it).
`start_adapter=` (what an evolve round passes: the served version) is M_{n-1} for the first
iteration.
"""

from __future__ import annotations

import re
import time

from pydantic import Field

from selfevolve.build import learner_base, served_policy
from selfevolve.config import RecipeConfig
from selfevolve.data.sources import logged_answers, tasks_for
from selfevolve.feedback.prompts import STAR_HINT
from selfevolve.run import Run
from selfevolve.training.learner import answer_message, sft, trained_tokens
from selfevolve.training.publish import publish, saved_update
from selfevolve.types import SamplingParams, Task, Trace, task_messages


class StarConfig(RecipeConfig):
    recipe: str = "star"
    iterations: int = Field(3, ge=1, description="outer iterations at most")
    train_split: str = Field("train", description="split the rationales are generated for")
    train_tasks: int = Field(2000, ge=1, description="training prompts per iteration")
    temperature: float = Field(1.0, ge=0, description="sampling temperature for rationales (0 = greedy)")
    rationalize: bool = Field(True, description="rationalise failures with the answer as a hint (false: the ablation)")
    patience: int = Field(1, ge=1, description="stop after this many iterations without a validation gain")
    min_gain: float = Field(0.0, ge=0, description="validation acc_t1 gain over the best earlier iteration that "
                            "counts as progress")
    lora: bool = Field(True, description="train a LoRA adapter (false: all weights)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    epochs: int = Field(2, ge=1, description="SFT epochs over the kept set")
    lr: float = Field(1e-3, gt=0, description="SFT learning rate (AdamW)")
    sft_batch_size: int = Field(32, ge=1, description="SFT batch size")
    start_adapter: str | None = Field(None, description="an adapter saved by a run: sampled from first (the M-step "
                                      "still trains from the base); what an evolve round gets, its served version")


def hinted(task: Task) -> str:
    return STAR_HINT.format(prompt=task.prompt, answer=task.reference)


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def reproduces_hint(response: str, task: Task, n: int = 4) -> bool:
    """A rationale that reached the answer by reading the hint, not by reasoning:
    - it refers to the hint ("the hint says ...");
    - it copies the hint's own words: any n-gram of the hinted prompt that is neither in the
      task's prompt nor in a plain statement of the answer ("the answer is y");
    - it copies a long reference (a code task's canonical solution, a worked solution): half
      or more of the reference's n-grams, when it has at least 6 of them.
    A short answer (a number) is not copying: the rationale must end in it."""
    if re.search(r"\bhint", response, re.IGNORECASE):
        return True
    said = _ngrams(response, n)
    own = _ngrams(task.prompt, n) | _ngrams(f"the answer is {task.reference}.", n)
    if (_ngrams(hinted(task), n) - own) & said:
        return True
    ref = _ngrams(task.reference or "", n)
    return len(ref) >= 6 and len(ref & said) >= len(ref) / 2


def training_example(trace: Trace) -> list[dict[str, str]]:
    """The SFT conversation for a kept or rationalised sample: the task's own prompt (never
    the hinted one) and the rationale."""
    return [*task_messages(trace.task), answer_message(trace.turns[-1])]


def sample(policy, tasks: list[Task], prompts: list[str], verifier, cfg: StarConfig, seed: int):
    """One rationale per prompt, scored against the task's reference."""
    sampling = SamplingParams(temperature=cfg.temperature, seed=seed, max_new_tokens=cfg.max_new_tokens)
    turns = [out[0] for out in policy.generate([task_messages(t, p) for t, p in zip(tasks, prompts)], sampling)]
    for turn, fb in zip(turns, verifier.verify_batch(tasks, [t.response for t in turns])):
        turn.feedback = fb
    return turns


def collect(policy, tasks: list[Task], verifier, cfg: StarConfig, iteration: int, run: Run) -> dict[str, int]:
    """Generate, keep, rationalise; store every sample with its outcome. Returns counts."""
    def trace(task, turn, phase, outcome, **meta):
        return Trace(task=task, turns=[turn], policy_version=policy.active_adapter, recipe=cfg.recipe, run=run.name,
                     round=iteration,
                     meta={"phase": phase, "outcome": outcome, "tokens": trained_tokens([turn]), **meta})

    seed = cfg.seed * 1000 + iteration
    logged = logged_answers(tasks)  # traffic's answers and verdicts: kept, or failures to rationalise
    run.trained_on(turn.feedback.details["trace"] for _, turn in logged)
    traces = [trace(t, turn, "logged", "kept" if turn.score == 1.0 else "failed") for t, turn in logged]
    tasks = [t for t in tasks if t.reference is not None or t.tests]  # what the verifier can score afresh
    turns = sample(policy, tasks, [t.prompt for t in tasks], verifier, cfg, seed)
    traces += [trace(t, turn, "generate", "kept" if turn.score == 1.0 else "failed") for t, turn in zip(tasks, turns)]
    failed = list({t.task.id: t.task for t in traces if t.meta["outcome"] == "failed" and t.task.reference is not None
                   }.values())  # one rationalisation per failed task, fresh or logged
    if cfg.rationalize and failed:
        hints = [hinted(t) for t in failed]
        for task, hint, turn in zip(failed, hints, sample(policy, failed, hints, verifier, cfg, seed + 500)):
            leak = reproduces_hint(turn.response, task)
            outcome = "rationalised" if turn.score == 1.0 and not leak else "rejected"
            traces.append(trace(task, turn, "rationalize", outcome, hint_prompt=hint, reproduces_hint=leak))
    run.store.append(traces)
    counts = {k: sum(t.meta["outcome"] == k for t in traces) for k in ("kept", "failed", "rationalised", "rejected")}
    return counts


def main(cfg: StarConfig, run: Run) -> None:
    policy = served_policy(cfg)
    base = learner_base(cfg, policy)  # the served model's weights, device and dtype
    tokenizer = base.tokenizer
    tasks = tasks_for(cfg, cfg.train_split, cfg.train_tasks)

    state = run.restore()
    if state is None:
        state = {"iteration": 0, "before": run.evaluate(policy, "before", test=True), "history": [], "adapter": None,
                 "stalled": 0}
    elif state["adapter"]:
        with run.rng_kept():  # as the uninterrupted run's RNG was at its checkpoint
            policy = saved_update(state["adapter"], cfg.lora).serve(policy, f"iter-{state['iteration'] - 1}")

    for it in range(state["iteration"], cfg.iterations):
        if state["stalled"] >= cfg.patience:
            print(f"validation acc_t1 plateaued for {state['stalled']} iteration(s); stopping before iteration {it}")
            break
        t0 = time.perf_counter()
        counts = collect(policy, tasks, run.verifier, cfg, it, run)
        t_sample = time.perf_counter() - t0

        # M-step from the base model, on this iteration's kept + rationalised samples (from the store).
        chosen = run.store.query(round=it, meta={"outcome": "kept"}) + run.store.query(round=it,
                                                                                       meta={"outcome": "rationalised"})
        convs = [training_example(t) for t in chosen]
        model = base.learner(cfg, lora=cfg.lora)  # from the base each iteration (paper)
        t1 = time.perf_counter()
        with run.progress(f"sft iteration {it}", total=cfg.epochs * -(-len(convs) // cfg.sft_batch_size)) as bar:
            stats = (sft(model, tokenizer, convs, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.sft_batch_size,
                         seed=cfg.seed + it, bar=bar, micro_batch_size=cfg.micro_batch_size) if convs else {})
        t_train = time.perf_counter() - t1

        path = run.dir / "adapters" / f"iter-{it}"
        policy = publish(policy, model, tokenizer, path, f"iter-{it}", lora=cfg.lora,
                         replaces=f"iter-{it - 1}" if state["adapter"] else None)

        metrics = run.evaluate(policy, f"iteration-{it}", round=it)
        best_before = max((h["acc_t1"] for h in state["history"]), default=None)
        gain = best_before is None or metrics["acc_t1"] > best_before + cfg.min_gain
        state["stalled"] = 0 if gain else state["stalled"] + 1
        run.log(iteration=it, **counts, time_sample=round(t_sample, 2), time_train=round(t_train, 2), **stats)
        state["history"].append({"iteration": it, **counts, **metrics})
        state.update(iteration=it + 1, adapter=str(path))
        run.checkpoint(state)

    run.finish_selected(policy, state["before"], state["history"], lora=cfg.lora)
