"""self_evolve — SELF: learn to critique and refine, then evolve on your own refinements.

    selfevolve run recipe=self_evolve seed=0

Lu et al., "SELF: Self-Evolution with Language Feedback" (arXiv 2310.00533). Two phases:

1. Meta-skill learning. Build tuples (x, y, f, ŷ): y the model's answer, f feedback on it,
   ŷ a refinement. f comes from a stronger critic when `judge=` is set (JudgeCritic), else
   from the verifier put into words (VerifierCritic, the reference never shown); ŷ is y
   when f finds no error, else a revision of y after f that the verifier accepts (up to
   `refine_samples` tries; when none is, the tuple teaches feedback only). Fine-tune on:
       feedback:    CRITIQUE(x, y) → f          (what SelfCritic asks; every tuple)
       refinement:  x, y, REVISE(f) → ŷ         (when y was refined)
       answer:      x → ŷ                       (when ŷ is accepted; keeps the answering skill)
2. Self-evolution, `iterations` times: the model answers unlabeled prompts (y), critiques
   itself (SelfCritic, f̂), refines when it found an error (ŷ); a filter keeps the ŷ judged
   correct — by the verifier when the prompts have references (`filter=verifier`), else by
   the model's own verdict on ŷ (`filter=self`); the choice is recorded on every trace —
   and the model is fine-tuned on x → ŷ mixed with the meta-skill data (against forgetting).

Objective of every fine-tune: next-token cross-entropy on the target message,
L(θ) = − Σ_t log pθ(target_t | context, target_<t), with a LoRA adapter that continues
across the phases (θ_meta, then θ_1, θ_2, ...), each published to the served policy.

Evaluation reports both modes: `acc_t1` is the direct answer, `acc_t2` the self-refined one
(`critic=self`, two attempts: answer, self-critique, revision unless the critique finds no
error), and `delta` the self-refinement gain.

Deviations, for the tiny world on 2 CPU cores: the meta-skill feedback comes from the
verifier (no GPT-4); 1,000 prompts per phase; LoRA instead of full fine-tuning; 2 epochs.
The adapter also trains the embedding rows of the words only feedback uses
(`feedback_tokens`, peft trainable tokens, at `token_lr`): the bundled `tiny` never saw
the critique's words, their embeddings are random, and LoRA alone cannot teach it to write
or read a critique. It is on for the bundled models only (`feedback_tokens=null`): a real model knows the
words, and at `token_lr` it would retrain the rows of common words (vLLM cannot load such an
adapter yet either). The critic learns the format and the verdicts' base rate, not to find
errors: docs/recipes.md, "SELF", has the numbers.

From logged traffic (`data=traces.sqlite`, `sources.logged_tasks`): a logged refinement trace
(y, the critique f the server's critic wrote, ŷ) joins the meta-skill tuples (`logged_tuples`)
when f's verdict agrees with y's score (a critique that called a wrong answer right would
teach the critic to miss errors), with ŷ only when ŷ scored 1 — by the verifier or a user's
`/v1/feedback`; the prompts with a reference also get fresh tuples as above. The tuples are
supervised targets, checked against the verdicts, so the version that logged them does not
matter (`since_version=` bounds their age).
"""

from __future__ import annotations

import time

from pydantic import Field

from selfevolve.build import learner_base, served_policy
from selfevolve.config import RecipeConfig
from selfevolve.data.sources import tasks_for, without_logs
from selfevolve.feedback.critics import JudgeCritic, SelfCritic, VerifierCritic
from selfevolve.feedback.prompts import CRITIQUE, REVISE_WITH_CRITIQUE
from selfevolve.loop import refine_batch
from selfevolve.models import BUNDLED
from selfevolve.policies import load_policy
from selfevolve.run import Run
from selfevolve.training.learner import answer_message, sft, trained_tokens
from selfevolve.training.publish import publish, saved_update
from selfevolve.types import SamplingParams, Trace, task_messages


class SelfConfig(RecipeConfig):
    recipe: str = "self_evolve"
    critic: str = Field("self", pattern="^(none|self|verifier|judge)$",
                        description="critic used by evaluation (SELF: self)")
    iterations: int = Field(2, ge=1, description="self-evolution iterations after meta-skill learning")
    meta_tasks: int = Field(1000, ge=1, description="prompts for the meta-skill tuples")
    evolve_tasks: int = Field(1000, ge=1, description="unlabeled prompts per self-evolution iteration")

    def train_limit(self) -> int:
        return self.meta_tasks + self.evolve_tasks * self.iterations
    refine_samples: int = Field(4, ge=1, description="tries to find an accepted refinement for a meta-skill tuple")
    filter: str = Field("verifier", pattern="^(verifier|self)$", description="who judges refinements in self-evolution")
    train_split: str = Field("train", description="split the prompts come from")
    temperature: float = Field(1.0, ge=0, description="sampling temperature for answers and refinements")
    critique_tokens: int = Field(48, ge=1, description="generation budget of a critique")
    epochs: int = Field(2, ge=1, description="SFT epochs per fine-tune")
    lr: float = Field(3e-4, gt=0, description="SFT learning rate (AdamW)")
    sft_batch_size: int = Field(32, ge=1, description="SFT batch size")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    feedback_tokens: bool | None = Field(None, description="also train the embeddings of the words only feedback "
                                         "uses (null: only for the bundled tiny, which never saw them)")
    token_lr: float = Field(1e-2, gt=0, description="learning rate of those embedding rows (AdamW)")


def meta_examples(trace: Trace) -> list[list[dict]]:
    """The training examples of a meta-skill tuple (x, y, f, ŷ) stored as a trace: the
    feedback skill (always: the verdict is right whether or not a refinement was found, and
    a critic must see wrong answers as often as right ones), the refinement skill (when y
    was refined), and the answer x → ŷ when the verifier accepted ŷ, which keeps the model
    answering questions while it learns to critique."""
    x, first = trace.task.prompt, trace.turns[0]
    f = first.critique.text
    out = [[{"role": "user", "content": CRITIQUE.format(question=x, answer=first.response, notes="")},
            {"role": "assistant", "content": f}]]
    if len(trace.turns) > 1:
        out.append(
            [
                *task_messages(trace.task),
                {"role": "assistant", "content": first.response},
                {"role": "user", "content": REVISE_WITH_CRITIQUE.format(critique=f)},
                {"role": "assistant", "content": trace.turns[-1].response},
            ]
        )
    if trace.turns[-1].score == 1.0:
        out.append([*task_messages(trace.task), {"role": "assistant", "content": trace.turns[-1].response}])
    return out


def logged_tuples(tasks) -> list[Trace]:
    """Meta-skill tuples from logged refinement traces: (x, y, f) when the critique's verdict
    on y agrees with y's score, with ŷ when the refinement scored 1 (its last verdict: a
    user's, if one came after)."""
    out = []
    for task in tasks:
        plain = without_logs(task)
        for a in task.meta.get("logged", []):
            turns = list(a.turns or [])
            if len(turns) < 2 or turns[0].critique is None or turns[0].score is None:
                continue
            if (turns[0].critique.verdict == "correct") != (turns[0].score == 1.0):
                continue
            out.append(Trace(task=plain, turns=turns if a.score == 1.0 else turns[:1],
                             meta={"phase": "meta", "logged": a.trace_id}))
    return out


def feedback_token_ids(tokenizer, tuples: list[Trace]) -> list[int]:
    """The tokens of the feedback skill that the answering skill never uses: the words of the
    critique and revision prompts and of the tuples' feedback, minus every token of their
    prompts and answers. A model may never have learned them (tiny's corpus has no critique
    text: their embeddings are still random) and a LoRA adapter cannot move an embedding,
    so their rows are trained too; the answering skill's tokens are left alone."""

    def ids(text: str) -> set[int]:
        return set(tokenizer(text, add_special_tokens=False)["input_ids"])

    feedback = ids(CRITIQUE.format(question="", answer="", notes="")) | ids(REVISE_WITH_CRITIQUE.format(critique=""))
    feedback = feedback.union(*(ids(t.turns[0].critique.text) for t in tuples))
    answering = set().union(*(ids(t.task.prompt) | ids(t.turns[0].response) for t in tuples))
    return sorted(feedback - answering)


def keep(trace: Trace, how: str) -> bool:
    """The self-evolution filter: is the answer the episode ended with correct? By the
    verifier's score, or by the model's own verdict (its critique of that answer found no
    error)."""
    last = trace.turns[-1]
    if how == "verifier":
        return last.score == 1.0
    return last.critique is not None and last.critique.verdict == "correct"


def meta_skill_tuples(policy, tasks, verifier, critic, cfg: SelfConfig, run: Run) -> list[Trace]:
    """(x, y, f, ŷ) tuples: answer, feedback from `critic`, and for wrong answers a
    refinement the verifier accepts when one of `refine_samples` tries is (else no ŷ)."""
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    traces = [
        Trace(
            task=t,
            turns=[o[0]],
            recipe=cfg.recipe,
            run=run.name,
            policy_version=policy.active_adapter,
            meta={"phase": "meta"},
        )
        for t, o in zip(tasks, policy.generate([task_messages(t) for t in tasks], sampling))
    ]
    for t, fb in zip(traces, verifier.verify_batch(tasks, [t.turns[0].response for t in traces])):
        t.turns[0].feedback = fb
    for t, f in zip(traces, critic.critique_batch(tasks, [t.turns for t in traces])):
        t.turns[0].critique = f
    wrong = [t for t in traces if t.turns[0].critique.verdict != "correct"]
    convs = [
        [
            *task_messages(t.task),
            {"role": "assistant", "content": t.turns[0].response},
            {"role": "user", "content": REVISE_WITH_CRITIQUE.format(critique=t.turns[0].critique.text)},
        ]
        for t in wrong
    ]
    tries = policy.generate(convs, sampling.model_copy(update={"n": cfg.refine_samples, "seed": cfg.seed + 1}))
    flat = [(t, turn) for t, turns in zip(wrong, tries) for turn in turns]
    for (t, turn), fb in zip(
        flat, verifier.verify_batch([t.task for t, _ in flat], [turn.response for _, turn in flat])
    ):
        turn.feedback = fb
        if fb.score == 1.0 and len(t.turns) == 1:
            t.turns.append(turn)
    run.store.append(traces)
    return traces


def evolve(policy, tasks, verifier, cfg: SelfConfig, iteration: int, run: Run) -> list[Trace]:
    """Answer, self-critique, self-refine unlabeled prompts; filter; store all."""
    # No verifier in the loop: the model answers, critiques and refines without any answer.
    critic = SelfCritic(policy, sampling=SamplingParams(temperature=0.0, max_new_tokens=cfg.critique_tokens))
    traces = refine_batch(
        tasks,
        policy,
        None,
        critic,
        max_turns=2,
        recipe=cfg.recipe,
        run=run.name,
        round=iteration,
        meta={"phase": "evolve", "filter": cfg.filter},
        sampling=SamplingParams(
            temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + iteration
        ),
    )
    if cfg.filter == "verifier":
        finals = verifier.verify_batch(tasks, [t.final for t in traces])
        for tr, fb in zip(traces, finals):
            tr.turns[-1].feedback = fb
    else:  # the model's own verdict on the answer it kept
        kept_answers = [t for t in traces if len(t.turns) > 1]
        for t, f in zip(
            kept_answers, critic.critique_batch([t.task for t in kept_answers], [t.turns for t in kept_answers])
        ):
            t.turns[-1].critique = f
    for t in traces:
        t.meta["kept"] = keep(t, cfg.filter)
        t.meta["tokens"] = trained_tokens(t.turns[-1:])
    run.store.append(traces)
    return [t for t in traces if t.meta["kept"]]


def fine_tune(learner, tokenizer, convs, cfg: SelfConfig, seed: int, run: Run, label: str) -> dict:
    with run.progress(label, total=cfg.epochs * -(-len(convs) // cfg.sft_batch_size)) as bar:
        return sft(learner, tokenizer, convs, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.sft_batch_size, seed=seed,
                   bar=bar, token_lr=cfg.token_lr, micro_batch_size=cfg.micro_batch_size)


def main(cfg: SelfConfig, run: Run) -> None:
    policy = served_policy(cfg)
    base = learner_base(cfg, policy)  # the served model's weights, device and dtype
    tokenizer = base.tokenizer
    verifier = run.verifier
    pool = tasks_for(cfg, cfg.train_split, cfg.train_limit())
    meta_pool, evolve_pool = pool[: cfg.meta_tasks], pool[cfg.meta_tasks :]

    state = run.restore()
    if state is None:
        state = {"phase": 0, "before": run.evaluate(policy, "before", test=True), "history": [], "adapter": None}
    elif state["adapter"]:
        with run.rng_kept():  # as the uninterrupted run's RNG was at its checkpoint
            policy = saved_update(state["adapter"]).serve(policy, f"phase-{state['phase'] - 1}")

    # Phase 0: meta-skill learning; phases 1..iterations: self-evolution. Each continues the adapter.
    for phase in range(state["phase"], cfg.iterations + 1):
        t0 = time.perf_counter()
        meta = run.store.query(meta={"phase": "meta"}) if phase else None
        if phase == 0:
            critic = (JudgeCritic(load_policy(cfg.judge)) if cfg.judge else VerifierCritic(verifier,
                                                                                           reveal_reference=False))
            meta = logged_tuples(meta_pool)
            run.trained_on(t.meta["logged"] for t in meta)
            run.store.append(meta)
            meta += meta_skill_tuples(policy, meta_pool, verifier, critic, cfg, run)
            train_rows = cfg.feedback_tokens if cfg.feedback_tokens is not None else cfg.model in BUNDLED
            state["tokens"] = feedback_token_ids(tokenizer, meta) if train_rows else []
            convs = [c for t in meta for c in meta_examples(t)]
            extra = {"tuples": len(meta), "feedback_by": critic.source, "feedback_tokens": len(state["tokens"])}
        else:
            chunk = evolve_pool[(phase - 1) * cfg.evolve_tasks : phase * cfg.evolve_tasks]
            kept = evolve(policy, chunk, verifier, cfg, phase, run)
            convs = [[*task_messages(t.task), answer_message(t.turns[-1])] for t in kept]
            convs += [c for t in meta for c in meta_examples(t)]
            extra = {"kept": len(kept), "evolved": len(chunk), "filter": cfg.filter,
                     "refined": sum(len(t.turns) > 1 for t in kept)}
        t_data = time.perf_counter() - t0
        t0 = time.perf_counter()
        learner = base.learner(cfg, init_from=state["adapter"], trainable_tokens=state.get("tokens"))
        stats = fine_tune(learner, tokenizer, convs, cfg, cfg.seed + phase, run, f"sft phase {phase}")
        t_train = time.perf_counter() - t0

        path = run.dir / "adapters" / f"phase-{phase}"
        policy = publish(policy, learner, tokenizer, path, f"phase-{phase}",
                         replaces=f"phase-{phase - 1}" if state["adapter"] else None)
        metrics = run.evaluate(policy, f"phase-{phase}", round=phase)
        run.log(phase=phase, examples=len(convs), time_data=round(t_data, 2), time_train=round(t_train, 2), **extra,
                **stats)
        state["history"].append({"phase": phase, **extra, **metrics})
        state.update(phase=phase + 1, adapter=str(path))
        run.checkpoint(state)

    after = run.evaluate(policy, "after", round=cfg.iterations, test=True)  # the final model, no selection
    run.finish(before=state["before"], after=after, adapter=f"adapters/phase-{cfg.iterations}",
               phases=state["history"])
