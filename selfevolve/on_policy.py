"""The step loop of an on-policy recipe (docs/architecture.md, "A recipe step"): each step's
rollouts on the serving thread, an update on the learner, the update saved and published to
the served policy, evaluations and checkpoints on the recipe's cadence, resume from the last
checkpoint. The recipe keeps what is its own — which rollouts, which loss — and passes them
in; this file keeps what every on-policy recipe would otherwise repeat, the part where a
mistake trains on the wrong model's samples.

Bounded staleness (`max_staleness=K`, docs/scaling.md): rollouts and adapter loads run on
one serving thread in submission order, and step j's rollouts are submitted once update
j − K is queued, so they are generated while the learner trains and are sampled by an
adapter exactly K updates old (fewer in the first K steps and after a resume, whose
in-flight batches come from the checkpoint's adapter). Nothing staler is generated, so
nothing is dropped; the recipe's update is told the batch is stale and corrects it. K = 0
waits for every rollout and load: the synchronous order (tests/recipes/test_staleness.py).
"""

from __future__ import annotations

import shutil
from typing import Any, Callable, TypedDict

from peft import get_peft_model_state_dict, set_peft_model_state_dict

from selfevolve.progress import Stopwatch
from selfevolve.run import Run
from selfevolve.training import distributed
from selfevolve.training.publish import save_update, saved_update
from selfevolve.training.rollout_thread import ServingThread


class StepState(TypedDict):
    """What a checkpoint holds besides the learner's and the optimizer's state: a resumed run
    continues at `step`, serving `adapter` (kept on disk until a later checkpoint)."""

    step: int                   # updates done
    before: dict                # the evaluation before training
    history: list[dict]         # every evaluation since, with its step
    adapter: str | None         # the adapter the served policy has at `step`


def on_policy_steps(run: Run, policy, learner, opt, tokenizer, total: int, max_staleness: int,
                    rollouts: Callable[[Any, int], tuple[list, dict]], update: Callable[[int, list, bool], dict],
                    evaluate_at: Callable[[int], bool], evaluated: Callable[[int, dict, list[dict]], dict],
                    checkpoint_every: int, name: str) -> tuple[Any, StepState]:
    """Run steps `state["step"]` .. `total` − 1 and return the policy serving the last update
    and the state. `rollouts(policy, j)` runs on the serving thread and returns this rank's
    traces of step j with the seconds of its phases; `update(j, traces, stale)` trains on the
    gathered batch and returns the parts to log; after the validation evaluation at each step
    s where `evaluate_at(s)`, `evaluated(s, metrics, history)` returns the entry to keep in
    the history (and may warn)."""
    state = run.restore()
    if state is None:
        state = StepState(step=0, before=run.evaluate(policy, "before", test=True), history=[], adapter=None)
    else:
        set_peft_model_state_dict(learner, state["learner"])
        opt.load_state_dict(state["optimizer"])
        if state["adapter"]:
            policy = saved_update(state["adapter"]).serve(policy, f"step-{state['step']}")
    serving, inflight = ServingThread(policy), {}
    clock = Stopwatch("generate", "verify", "train", "sync", "checkpoint")
    with serving, run.progress(name, total=total, completed=state["step"]) as bar:
        for step in range(state["step"], total):
            for j in range(step, min(step + max_staleness + 1, total)):
                if j not in inflight:  # sampled by the last update queued: `step`'s
                    inflight[j] = (serving.submit(rollouts, j), step)
            future, version = inflight.pop(step)
            with clock("wait"):
                mine, seconds = future.result()
            for phase, t in seconds.items():
                clock.add(phase, t)
            traces = distributed.gather(mine)  # every rank's traces, in the batch's order
            run.store.append(traces)
            with clock("train"):
                parts = update(step, traces, step > version)

            with clock("sync"):  # rollouts submitted from now on come from this update
                path = run.dir / "adapters" / f"step-{step + 1}"
                loaded = serving.publish(save_update(learner, tokenizer, path), f"step-{step + 1}",
                                         replaces=f"step-{step}" if state["adapter"] else None)
                if not max_staleness:
                    loaded.result()  # nothing overlaps: the synchronous order
                if state["adapter"]:
                    run.retire(state["adapter"])  # deleted once a checkpoint no longer refers to it
                state["adapter"] = str(path)

            times = clock.lap()
            wait = times.pop("time_wait")
            overlap = {"staleness": step - version, "time_wait": wait} if max_staleness else {}
            run.log(step=step + 1, **parts, **overlap, **times)
            state["step"] = step + 1
            if evaluate_at(state["step"]):
                policy = serving.drain()  # rollouts in flight finish first; then nothing runs beside evaluation
                metrics = run.evaluate(policy, f"step-{state['step']}", round=state["step"])
                state["history"].append(evaluated(state["step"], metrics, state["history"]))
            if state["step"] % checkpoint_every == 0 or state["step"] == total or run.stop_requested:
                with clock("checkpoint"):  # logged with the next step
                    serving.drain()  # every queued load has read its adapter before retired ones are deleted
                    run.checkpoint({**state, "learner": get_peft_model_state_dict(learner),
                                    "optimizer": opt.state_dict()})
            bar.advance()
        policy = serving.drain()
    if state["adapter"] and run.main:
        shutil.copytree(state["adapter"], run.dir / "adapters" / "final", dirs_exist_ok=True)
    return policy, state
