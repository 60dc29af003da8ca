"""The evolve gate's error rates, by simulation: how often an identical candidate is promoted
(false promotion) and how often a +5-point one is (power), for `evolve.gate` (exact one-sided
sign test, alpha 0.05, at least 10 differing tasks) side by side with the rule it replaced
(mean gain > 0 and the lower end of a 95% paired-bootstrap interval ≥ 0).

Each simulated round: N validation tasks; on each, the candidate beats the served version
with probability (d + g) / 2, loses with (d − g) / 2, else ties (d: the share of tasks where
the two differ, g: the true gain). 2,000 rounds per setting, seeded; the bootstrap draws its
2,000 resampled (wins, losses) counts from the multinomial, which is the same distribution
as resampling the tasks.
"""

from __future__ import annotations

import numpy as np

from selfevolve.evolve import gate

ROUNDS, RESAMPLES = 2000, 2000


def _old_rule(rng, wins: int, losses: int, n: int) -> bool:
    if wins <= losses:
        return False
    w, l_ = rng.multinomial(n, [wins / n, losses / n, 1 - (wins + losses) / n], size=RESAMPLES)[:, :2].T
    return float(np.percentile((w - l_) / n, 2.5)) >= 0


def rates(n: int, d: float, g: float, seed: int = 0) -> tuple[float, float]:
    """(old rule's promotion rate, gate's promotion rate) over ROUNDS simulated rounds."""
    rng = np.random.default_rng(seed)
    old = new = 0
    for _ in range(ROUNDS):
        wins, losses, _ = rng.multinomial(n, [(d + g) / 2, (d - g) / 2, 1 - d])
        old += _old_rule(rng, wins, losses, n)
        current = [0.0] * n
        candidate = [1.0] * wins + [-1.0] * losses + [0.0] * (n - wins - losses)
        new += gate(current, candidate)["decision"] == "promoted"
    return old / ROUNDS, new / ROUNDS


SETTINGS = [(200, 0.02), (200, 0.10), (200, 0.20), (500, 0.02), (500, 0.10), (500, 0.20)]


def run() -> dict:
    rows, ratios = [], []
    for n, d in SETTINGS:
        old0, new0 = rates(n, d, 0.0)
        power = "— (a gain above the share that differs is impossible)"
        if d > 0.05:
            old5, new5 = rates(n, d, 0.05, seed=1)
            power = f"power at +5 points {new5:.3f} (was {old5:.3f})"
        rows.append((f"N={n} tasks, {d:.0%} differ", f"false promotion {new0:.3f} (was {old0:.3f})", power))
        ratios.append((f"false promotion, N={n}, {d:.0%} differ: gate / old rule", f"{new0:.3f} / {old0:.3f}"))
    return {"title": "Evolve gate error rates", "doc": __doc__.strip(), "rows": rows, "ratios": ratios}


if __name__ == "__main__":
    for row in run()["rows"]:
        print(" | ".join(row))
