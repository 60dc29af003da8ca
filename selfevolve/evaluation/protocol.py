"""The evaluation protocol (docs/architecture.md, "Evaluation protocol"): what every evaluation
reports, so that a self-correction claim survives the reviews the literature now applies
(Huang et al., ICLR 2024; Kamoi et al., TACL 2024):

- the SCoRe metrics (metrics.py), each with a 95% **paired bootstrap** interval over tasks
  (seeded: the same resampled task sets for every metric, so differences are paired);
- `p_flip`: the exact two-sided McNemar test of the i→c against the c→i counts — does the
  second turn fix more answers than it breaks, beyond chance?
- **equal-budget baselines** at k = the number of attempts: k independent first-turn samples
  give `maj_at_k` (self-consistency: the most common final answer, ties to the earliest
  sample) and `pass_at_k` (any sample right: the verifier picks, an oracle upper bound),
  with the samples and tokens each method spent (`budget`), so "revise" and "sample more"
  are one table; `vs_maj_at_k` is acc_t2 − maj_at_k, paired;
- `feedback`: `intrinsic` (the model alone: SCoRe's instruction or its own critique),
  `external` (a judge model), or `oracle` (the reference reaches the policy or decides when
  to stop: `critic=verifier`, `stop_when_correct`, or a critique the counterfactual check
  below finds to depend on correctness). Oracle numbers are never intrinsic self-correction.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np

from selfevolve.evaluation.metrics import self_correction_metrics
from selfevolve.types import Critic, Feedback, Trace, Turn, TurnPolicy

LEVEL = 0.95
PROTOCOL_KEYS = ("maj_at_k", "pass_at_k", "vs_maj_at_k", "p_flip", "feedback", "split", "budget", "intervals")
INTERVAL_KEYS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "edit_ratio", "maj_at_k", "pass_at_k",
                 "vs_maj_at_k")


def with_interval(block: dict, key: str) -> str:
    """`0.678 [0.636, 0.718]`: a metric with its 95% interval when it has one."""
    ci = (block.get("intervals") or {}).get(key)
    return f"{block.get(key)}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def columns(traces: list[Trace], samples: list[list[Turn]] | None = None) -> dict[str, np.ndarray]:
    """Per-task values whose means are the metrics (edit is NaN for a one-turn trace)."""
    from rapidfuzz.distance import Levenshtein

    c1 = np.array([t.correct_at(1) for t in traces], dtype=float)
    c2 = np.array([t.correct_at(2) for t in traces], dtype=float)
    edit = np.array([Levenshtein.normalized_distance(t.turns[0].response, t.turns[1].response)
                     if len(t.turns) >= 2 else np.nan for t in traces])
    out = {"acc_t1": c1, "acc_t2": c2, "delta": c2 - c1, "delta_i2c": (1 - c1) * c2, "delta_c2i": c1 * (1 - c2),
           "edit_ratio": edit}
    if samples is not None:
        out["maj_at_k"] = np.array([majority_correct(s) for s in samples], dtype=float)
        out["pass_at_k"] = np.array([any(x.score is not None and x.score >= 1.0 for x in s) for s in samples],
                                    dtype=float)
        out["vs_maj_at_k"] = c2 - out["maj_at_k"]
    return out


def bootstrap(cols: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of each column's mean, over the same `resamples` resampled
    task sets (paired). A column that is NaN everywhere has no interval.

    >>> ci = bootstrap({"x": np.array([0.0, 1.0] * 50)}, seed=0)["x"]
    >>> ci[0] < 0.5 < ci[1] and ci[1] - ci[0] < 0.25
    True
    """
    n = len(next(iter(cols.values())))
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    lo, hi = 100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2
    out = {}
    for k, v in cols.items():
        if np.isnan(v).all():
            continue
        with warnings.catch_warnings():  # a resample of only one-turn traces has no edit ratio
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(v[idx], axis=1)
        out[k] = [round(float(np.nanpercentile(means, lo)), 4), round(float(np.nanpercentile(means, hi)), 4)]
    return out


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b flips one way and c the other (binomial, p=1/2).

    >>> mcnemar_p(0, 0), mcnemar_p(3, 3), round(mcnemar_p(10, 0), 4)
    (1.0, 1.0, 0.002)
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return round(min(1.0, 2 * tail), 4)


def vote_key(turn: Turn) -> str | None:
    """What a sample votes for: the final answer the verifier extracted (details "answers" /
    "answer"), else the whole response; None when the verifier found no final answer."""
    d = turn.feedback.details if turn.feedback is not None else {}
    answers = d.get("answers", [d["answer"]] if "answer" in d else None)
    if answers is None:
        return " ".join(turn.response.split())
    if not answers:
        return None
    return str(answers[-1]).strip().replace(",", "").lower()


def majority_correct(samples: list[Turn]) -> bool:
    """Self-consistency: is the most common answer among the samples right? Ties go to the
    answer that appeared first; samples without a final answer do not vote."""
    keys = [vote_key(s) for s in samples]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == top)
    chosen = samples[keys.index(winner)]
    return chosen.score is not None and chosen.score >= 1.0


def _spent(turns: list[Turn]) -> dict[str, int | None]:
    counts = [len(t.token_ids) if t.token_ids is not None else None for t in turns]
    return {"samples": len(turns), "tokens": None if None in counts else sum(counts)}


def feedback_kind(critic: str | None, stop_when_correct: bool = False) -> str:
    """intrinsic | external | oracle, from how the loop was configured."""
    if critic == "verifier" or stop_when_correct:
        return "oracle"
    return "external" if critic == "judge" else "intrinsic"


def depends_on_correctness(critic: Critic | TurnPolicy | None, traces: list[Trace], n: int = 16) -> bool:
    """Counterfactual check: critique up to `n` first attempts twice, once as they were and
    once with the verifier's score flipped and the reference withheld (same batch shapes,
    so a deterministic critic that ignores both writes the same words). Any difference means
    the second-turn prompt carries correctness: oracle feedback."""
    picked = [t for t in traces if len(t.turns) >= 2 and t.turns[0].feedback is not None][:n]
    if not hasattr(critic, "critique_batch") or not picked:  # none, or a fixed instruction: no critique to check
        return False

    def flipped(turn: Turn) -> Turn:
        fb = turn.feedback
        score = None if fb.score is None else 1.0 - float(fb.score >= 1.0)
        return turn.model_copy(update={"feedback": Feedback(score=score, text="withheld", source=fb.source),
                                       "critique": None})

    real = critic.critique_batch([t.task for t in picked], [[t.turns[0].model_copy(update={"critique": None})]
                                                            for t in picked])
    counter = critic.critique_batch([t.task.model_copy(update={"reference": "withheld"}) for t in picked],
                                    [[flipped(t.turns[0])] for t in picked])
    return any(a.text != b.text or a.verdict != b.verdict for a, b in zip(real, counter))


def collapse(history: list[dict], min_edit_ratio: float, patience: int) -> str | None:
    """SCoRe's two failure modes in a run's evaluations (each with `stage`, `edit_ratio` and
    `delta`), or None: the second attempt no longer edits (the last edit ratio below
    `min_edit_ratio`), or its edits do not help (delta ≤ 0 in the last `patience` Stage II
    evaluations)."""
    last, stage2 = history[-1], [h for h in history if h["stage"] == 2]
    if last["edit_ratio"] < min_edit_ratio:
        return f"edit ratio {last['edit_ratio']} < {min_edit_ratio}: the second attempt copies the first"
    if len(stage2) >= patience and all(h["delta"] <= 0 for h in stage2[-patience:]):
        return f"delta <= 0 for {patience} Stage II evaluations: revisions do not help"
    return None


def protocol_metrics(traces: list[Trace], samples: list[list[Turn]] | None, feedback: str,
                     resamples: int = 2000, seed: int = 0, temperature: float | None = None) -> dict:
    """The full report of one evaluation: the SCoRe metrics, `intervals`, `p_flip`, the
    equal-budget baselines with their `budget`, and the `feedback` label."""
    out = self_correction_metrics(traces)
    cols = columns(traces, samples)
    if samples is not None:
        out["maj_at_k"] = round(float(cols["maj_at_k"].mean()), 4)
        out["pass_at_k"] = round(float(cols["pass_at_k"].mean()), 4)
        out["vs_maj_at_k"] = round(float(cols["vs_maj_at_k"].mean()), 4)
        sampled = _spent([x for s in samples for x in s])  # maj@k and pass@k read the same samples
        out["budget"] = {"k": len(samples[0]) if samples else 0, "temperature": temperature,
                         "first_turn": _spent([t.turns[0] for t in traces if t.turns]),
                         "refine": _spent([x for t in traces for x in t.turns]),
                         "maj_at_k": sampled, "pass_at_k": dict(sampled)}
    out["p_flip"] = mcnemar_p(int(cols["delta_i2c"].sum()), int(cols["delta_c2i"].sum()))
    out["feedback"] = feedback
    out["intervals"] = bootstrap(cols, resamples, seed)
    return out


def paired_difference(a: list[Trace], b: list[Trace], resamples: int = 2000, seed: int = 0) -> dict:
    """B − A on the tasks both evaluated (paired by task id): each metric's difference and
    its 95% paired-bootstrap interval, for deciding whether two runs (an ablation) differ."""
    by_id = {t.task.id: t for t in a}
    common = [t.task.id for t in b if t.task.id in by_id]
    if not common:
        raise ValueError("the two evaluations share no task ids")
    b_by_id = {t.task.id: t for t in b}
    ca, cb = columns([by_id[i] for i in common]), columns([b_by_id[i] for i in common])
    diff = {k: cb[k] - ca[k] for k in ca}
    means = {k: round(float(np.nanmean(v)), 4) for k, v in diff.items() if not np.isnan(v).all()}
    return {"n": len(common), "difference": means, "intervals": bootstrap(diff, resamples, seed)}
