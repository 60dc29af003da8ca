"""SCoRe's self-correction metrics (the SCoRe paper's), reported by every evaluation.

- acc_t1, acc_t2: accuracy of the answer standing after turn 1 / turn 2;
- delta = acc_t2 - acc_t1;
- delta_i2c: share of all tasks wrong at t1 and right at t2; delta_c2i: right -> wrong;
- edit_ratio: mean normalised Levenshtein distance between the two attempts (0 = the
  second attempt copies the first: the collapse SCoRe warns about);
- truncated: share of all attempts cut at the generation budget (finish_reason "length"):
  scored as given, but a high share means max_new_tokens is too small to judge the model;
- n: tasks evaluated;
- critic_tpr, critic_fpr (only when the first answers were critiqued, e.g. `critic=self`):
  the share of wrong / of right first answers the critic called wrong. A critic that finds
  errors has tpr well above fpr; one that only learned how often to object has tpr ≈ fpr.
"""

from __future__ import annotations

from rapidfuzz.distance import Levenshtein

from selfevolve.types import Trace

KEYS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "edit_ratio", "truncated", "n")
CRITIC_KEYS = ("critic_tpr", "critic_fpr")  # present only when first answers were critiqued


def self_correction_metrics(traces: list[Trace]) -> dict[str, float]:
    """
    >>> from selfevolve.types import Task, Turn, Feedback
    >>> def tr(*scores): return Trace(task=Task(id="x", prompt="p"),
    ...     turns=[Turn(response=f"a{s}", feedback=Feedback(score=s)) for s in scores])
    >>> m = self_correction_metrics([tr(0, 1), tr(1, 1), tr(1, 0), tr(0, 0)])
    >>> m["acc_t1"], m["acc_t2"], m["delta"], m["delta_i2c"], m["delta_c2i"]
    (0.5, 0.5, 0.0, 0.25, 0.25)
    """
    n = len(traces)
    if n == 0:
        raise ValueError("no traces to compute metrics on")
    t1 = [t.correct_at(1) for t in traces]
    t2 = [t.correct_at(2) for t in traces]
    pairs = [(t.turns[0].response, t.turns[1].response) for t in traces if len(t.turns) >= 2]
    attempts = [x for t in traces for x in t.turns]
    out = {
        "acc_t1": sum(t1) / n,
        "acc_t2": sum(t2) / n,
        "delta": (sum(t2) - sum(t1)) / n,
        "delta_i2c": sum((not a) and b for a, b in zip(t1, t2)) / n,
        "delta_c2i": sum(a and (not b) for a, b in zip(t1, t2)) / n,
        "edit_ratio": sum(Levenshtein.normalized_distance(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0,
        "truncated": sum(x.finish_reason == "length" for x in attempts) / max(1, len(attempts)),
        "n": n,
    }
    verdicts = [(ok, t.turns[0].critique.verdict) for ok, t in zip(t1, traces)
                if t.turns[0].critique is not None and t.turns[0].critique.verdict]
    for key, first_right in zip(CRITIC_KEYS, (False, True)):
        said = [v == "wrong" for ok, v in verdicts if ok == first_right]
        if said:
            out[key] = sum(said) / len(said)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
