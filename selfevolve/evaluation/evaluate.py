"""Evaluation: run the loop over held-out tasks with greedy decoding and no oracle
stopping (every task gets all `max_turns` attempts; the verifier only scores), draw the
equal-budget baseline (k = max_turns independent first-turn samples), and report the
protocol (selfevolve/evaluation/protocol.py): metrics with intervals, p_flip, maj@k / pass@k, feedback."""

from __future__ import annotations

import sys

from selfevolve.evaluation.protocol import depends_on_correctness, protocol_metrics
from selfevolve.loop import refine_batch
from selfevolve.types import (
    Critic,
    Policy,
    SamplingParams,
    Task,
    Trace,
    Turn,
    TurnPolicy,
    Verifier,
    as_verifier,
    task_messages,
)


def evaluate(policy: Policy, tasks: list[Task], verifier: Verifier, max_turns: int = 2,
             critic: Critic | TurnPolicy | None = None, sampling: SamplingParams | None = None,
             feedback: str = "intrinsic",
             baseline_temperature: float | None = 1.0, seed: int = 0, bootstrap: int = 2000,
             **trace_fields) -> tuple[dict, list[Trace], list[list[Turn]] | None]:
    """The protocol metrics, the traces, and the baseline samples (None with
    `baseline_temperature=None`). `feedback` is what the configuration says
    (`protocol.feedback_kind`); a critique found to depend on correctness makes it oracle."""
    sampling = sampling or SamplingParams(temperature=0.0)
    verifier = as_verifier(verifier)
    traces = refine_batch(tasks, policy, verifier=verifier, turns=critic, max_turns=max_turns, sampling=sampling,
                          **trace_fields)
    samples = None
    if baseline_temperature is not None:
        convs = [task_messages(t) for t in tasks]
        draw = SamplingParams(temperature=baseline_temperature, n=max_turns, seed=seed,
                              max_new_tokens=sampling.max_new_tokens)
        samples = policy.generate(convs, draw)
        flat = [(t, s) for t, ss in zip(tasks, samples) for s in ss]
        for (_, s), fb in zip(flat, verifier.verify_batch([t for t, _ in flat], [s.response for _, s in flat])):
            s.feedback = fb
    if feedback != "oracle" and depends_on_correctness(critic, traces):
        print("warning: the critique between turns changes with the first answer's correctness: "
              "reported as oracle feedback", file=sys.stderr)
        feedback = "oracle"
    metrics = protocol_metrics(traces, samples, feedback, resamples=bootstrap, seed=seed,
                               temperature=baseline_temperature)
    return metrics, traces, samples
