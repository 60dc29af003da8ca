"""The loop: generate -> feedback -> revise, for one task or many.

Per turn, every still-active task is answered in one batched `policy.generate` call and
scored by the verifier (the reward, `Turn.feedback`); then the turn policy
(selfevolve/turns.py) gives each task that has turns left its next user message, or ends
it: SCoRe's instruction by default, a critic's critique (`Turn.critique`; a "correct"
verdict ends the episode), oracle stopping with `StopWhenCorrect`. A task also stops at
`max_turns`.
"""

from __future__ import annotations

import time

from selfevolve.turns import as_turn_policy
from selfevolve.types import (
    Conversation,
    Critic,
    Policy,
    SamplingParams,
    Task,
    Trace,
    TurnPolicy,
    Verifier,
    as_verifier,
    task_messages,
)


def as_task(x: Task | str, i: int = 0) -> Task:
    return x if isinstance(x, Task) else Task(id=f"prompt-{i}", prompt=x)


def conversation(trace: Trace, messages: list[str], system: str | None = None,
                 window: int | None = None) -> Conversation:
    """The messages the policy sees before its next turn: the task's conversation
    (`types.task_messages`, after `system` unless it has a system message of its own), then
    each attempt and the user message that followed it (`messages[k]` after turn k), only
    the last `window` attempts where one is set."""
    msgs: Conversation = task_messages(trace.task)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    pairs = list(zip(trace.turns, messages, strict=True))
    for t, said in pairs[-window:] if window else pairs:
        msgs += [{"role": "assistant", "content": t.response}, {"role": "user", "content": said}]
    return msgs


def refine_batch(tasks: list[Task | str], policy: Policy, verifier: Verifier | None = None,
                 turns: TurnPolicy | Critic | None = None, max_turns: int = 2, sampling: SamplingParams | None = None,
                 system: str | None = None, on_token: list | None = None, **trace_fields) -> list[Trace]:
    """Run the loop on many tasks, batching generation (and critique) across tasks per turn.
    `turns` is a TurnPolicy, or a Critic (its critique), or None (SCoRe's instruction).
    Returns one Trace per task, in order. `trace_fields` (recipe, run, round, meta) go on
    every Trace. `on_token[i]`, where given (a policy whose `generate` streams: HFPolicy), is
    called as `(turn, token_id)` with each token of task i's attempts as it is generated."""
    sampling = sampling or SamplingParams()
    verifier = as_verifier(verifier) if verifier is not None else None
    turns = as_turn_policy(turns)
    if sampling.n != 1:
        raise ValueError("the loop takes one sample per turn (n=1); ask the policy directly for best-of-n")
    traces = [Trace(task=as_task(t, i), policy_version=policy.active_adapter, **trace_fields)
              for i, t in enumerate(tasks)]
    active, said = list(range(len(traces))), [[] for _ in traces]  # said[i]: the messages after i's turns
    for turn in range(max_turns):
        if not active:
            break
        s = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + turn})
        convs = [conversation(traces[i], said[i], system, turns.window) for i in active]
        streams = {} if not on_token else {"on_token": [
            None if on_token[i] is None else (lambda _, tok, f=on_token[i], k=turn: f(k, tok)) for i in active]}
        outs = policy.generate(convs, s, **streams)
        for i, out in zip(active, outs):
            traces[i].turns.append(out[0])
        if verifier is not None:
            scored = [i for i in active if traces[i].task.reference is not None or traces[i].task.tests]
            fbs = verifier.verify_batch([traces[i].task for i in scored],
                                        [traces[i].turns[-1].response for i in scored])
            for i, fb in zip(scored, fbs):
                traces[i].turns[-1].feedback = fb
        going, active = active if turn + 1 < max_turns else [], []
        for i, message in zip(going, turns.respond([traces[i] for i in going]) if going else []):
            if message is not None:
                said[i].append(message)
                active.append(i)
    now = time.time()
    for t in traces:
        t.finished = now
    return traces
