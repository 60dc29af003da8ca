"""The loop: generate -> feedback -> revise, for one task or many.

Per turn, every still-active task is answered in one batched `policy.generate` call, then
scored by the verifier (the reward, `Turn.feedback`) and critiqued by the critic (the text
shown to the policy, `Turn.critique`). A task stops when
  - the verifier scores 1 and `stop_when_correct` (oracle stopping; off in evaluation,
    where the verifier must not steer the policy),
  - the critic's verdict is "correct" (it sees nothing to fix), or
  - `max_turns` is reached.
Without a critic the revision prompt is SCoRe's correction instruction (intrinsic
self-correction); with one, the critique followed by a request to rewrite.
"""

from __future__ import annotations

import time

from .feedback.prompts import REVISE_WITH_CRITIQUE, SCORE_INSTRUCTION
from .types import Conversation, Critic, Policy, SamplingParams, Task, Trace, Verifier, as_critic, as_verifier


def as_task(x: Task | str, i: int = 0) -> Task:
    return x if isinstance(x, Task) else Task(id=f"prompt-{i}", prompt=x)


def conversation(trace: Trace, instruction: str = SCORE_INSTRUCTION, system: str | None = None,
                 memory: int | None = None) -> Conversation:
    """The messages the policy sees before its next turn: the task, then each attempt and
    the critique (or instruction) after it; with `memory=k` only the last k attempts (a
    critic's text carries its notes on older ones, Reflexion-style)."""
    msgs: Conversation = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": trace.task.prompt})
    for t in (trace.turns[-memory:] if memory else trace.turns):
        msgs.append({"role": "assistant", "content": t.response})
        if t.critique is not None and t.critique.text:
            msgs.append({"role": "user", "content": REVISE_WITH_CRITIQUE.format(critique=t.critique.text)})
        else:
            msgs.append({"role": "user", "content": instruction})
    return msgs


def refine_batch(tasks: list[Task | str], policy: Policy, verifier: Verifier | None = None,
                 critic: Critic | None = None, max_turns: int = 2, sampling: SamplingParams | None = None,
                 stop_when_correct: bool = True, instruction: str = SCORE_INSTRUCTION,
                 system: str | None = None, memory: int | None = None, **trace_fields) -> list[Trace]:
    """Run the loop on many tasks, batching generation (and critique) across tasks per turn.
    Returns one Trace per task, in order. `trace_fields` (recipe, run, round, meta) go on
    every Trace."""
    sampling = sampling or SamplingParams()
    verifier = as_verifier(verifier) if verifier is not None else None
    critic = as_critic(critic) if critic is not None else None
    if sampling.n != 1:
        raise ValueError("the loop takes one sample per turn (n=1); ask the policy directly for best-of-n")
    traces = [Trace(task=as_task(t, i), policy_version=policy.active_adapter, **trace_fields)
              for i, t in enumerate(tasks)]
    active = list(range(len(traces)))
    for turn in range(max_turns):
        if not active:
            break
        s = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + turn})
        outs = policy.generate([conversation(traces[i], instruction, system, memory) for i in active], s)
        for i, out in zip(active, outs):
            traces[i].turns.append(out[0])
        if verifier is not None:
            scored = [i for i in active if traces[i].task.reference is not None or traces[i].task.tests]
            fbs = verifier.verify_batch([traces[i].task for i in scored],
                                        [traces[i].turns[-1].response for i in scored])
            for i, fb in zip(scored, fbs):
                traces[i].turns[-1].feedback = fb
        going = [
            i
            for i in active
            if turn + 1 < max_turns
            and not (stop_when_correct and traces[i].turns[-1].score is not None and traces[i].turns[-1].score >= 1.0)
        ]
        if critic is not None and going:
            tasks_, turns_ = [traces[i].task for i in going], [traces[i].turns for i in going]
            fbs = critic.critique_batch(tasks_, turns_)
            for i, fb in zip(going, fbs):
                traces[i].turns[-1].critique = fb
            going = [i for i in going if traces[i].turns[-1].critique.verdict != "correct"]
        active = going
    now = time.time()
    for t in traces:
        t.finished = now
    return traces
