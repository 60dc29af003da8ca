"""Evaluation: run the loop over held-out tasks with greedy decoding and no oracle
stopping (every task gets all `max_turns` attempts; the verifier only scores), then
compute the self-correction metrics."""

from __future__ import annotations

from .loop import refine_batch
from .metrics import self_correction_metrics
from .types import Critic, Policy, SamplingParams, Task, Trace, Verifier


def evaluate(policy: Policy, tasks: list[Task], verifier: Verifier, max_turns: int = 2,
             critic: Critic | None = None, sampling: SamplingParams | None = None,
             **trace_fields) -> tuple[dict[str, float], list[Trace]]:
    """Metrics (acc_t1, acc_t2, delta, delta_i2c, delta_c2i, edit_ratio, n) and the traces."""
    traces = refine_batch(tasks, policy, verifier=verifier, critic=critic, max_turns=max_turns,
                          sampling=sampling or SamplingParams(temperature=0.0),
                          stop_when_correct=False, **trace_fields)
    return self_correction_metrics(traces), traces
