"""The objectives of the RL and preference recipes, as small functions: the KL penalty (and
its logged value), SCoRe's shaped reward, the credit each attempt gets and its baselines,
the REINFORCE loss, SPIN's loss; and what stale or remote rollouts need: the sampler's
behaviour log-probs placed on the trained tokens, truncated importance weights, and the
learner/server check on them (`SampledCheck`, the one stateful piece: it sums over a step's
micro-batches and, with `total`, over the ranks). Pure tensor functions otherwise, tested
against hand-computed values and, for what they are differentiated for, against the exact
expected gradient (tests/training/test_losses.py).

Shapes: `logp`, `ref_logp`, `mask` are (B, T) per-token values of the sampled tokens (the
output of `learner.token_logprobs`), `adv` is (B,).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from selfevolve.training import distributed


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t KL(π ‖ π_ref) *value* per sequence, with the "k3" estimator (Schulman, 2020)

        k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1  ≥ 0,

    unbiased and non-negative on samples of π. For the log only (computed without grad):
    used as a loss, its gradient has expectation Σ (π − π_ref)∇log π = ∇KL(π_ref ‖ π), the
    *other* direction; `kl_loss` is the one to differentiate."""
    with torch.no_grad():
        d = (ref_logp - logp) * mask
        return ((torch.exp(d) - d - 1) * mask).sum(-1)


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t ½ (log π_t − log π_ref,t)² per sequence ("k2"): a KL penalty whose gradient is the
    paper's direction. On samples y ~ π its expected gradient per token is
    Σ_y π(y)(log π(y) − log π_ref(y))∇log π(y) = ∇KL(π ‖ π_ref) (Σ_y π ∇log π = 0), checked
    against autograd of the exact KL in tests/training/test_losses.py. Per token: the dependence of
    later tokens' KL on an earlier token (a score-function term) is left out, as in the
    per-token KL penalties of PPO/GRPO-style trainers. Its value is ≈ KL for small gaps."""
    d = (logp - ref_logp.detach()) * mask
    return (0.5 * d * d).sum(-1)


def shaped_reward(r1: torch.Tensor, r2: torch.Tensor, alpha: float) -> torch.Tensor:
    """SCoRe Stage II reward of the second attempt: r̂(y2) = r(y2) + α·(r(y2) − r(y1)).

    With α = 10 a right→wrong change costs −10, wrong→right earns 11, and keeping a right
    answer earns 1."""
    return r2 + alpha * (r2 - r1)


CREDITS = ("instantaneous", "trajectory")


def attempt_credit(r1: torch.Tensor, r2: torch.Tensor, alpha: float,
                   credit: str = "instantaneous") -> tuple[torch.Tensor, torch.Tensor]:
    """The return each attempt's tokens are credited with in Stage II.

    `instantaneous` (the paper's: "we used only the instantaneous reward in our policy
    gradient objective, which is equivalent to returns with discount factor γ = 0", SCoRe
    Appendix A.4): y1 gets r(y1), y2 gets r̂(y2). Given x and y1, −α·r(y1) in r̂(y2) is a
    constant, so y1 follows ∇E[r(y1)] whatever α, and y2 follows (1 + α)·∇E[r(y2) | y1]: the
    bonus scales the second attempt's step, and its variance, not its direction.

    `trajectory` (γ = 1, the gradient of Eq. 4's sum E[r(y1) + r̂(y2)]): y1 gets the
    return-to-go r(y1) + r̂(y2) = (1 − α)·r(y1) + (1 + α)·r(y2), y2 gets r̂(y2). α then
    changes the direction of learning: y1 is pushed toward first answers that the second
    attempt fixes (with α = 10, a right y1 is credited −9 unless y2 stays right), a pressure
    the β1 KL on y1 holds back. The paper reports that γ > 0 collapses (its Figure 10).

    >>> r1, r2 = torch.tensor([1., 1., 0., 0.]), torch.tensor([1., 0., 1., 0.])
    >>> [c.tolist() for c in attempt_credit(r1, r2, 10.0)]
    [[1.0, 1.0, 0.0, 0.0], [1.0, -10.0, 11.0, 0.0]]
    >>> [c.tolist() for c in attempt_credit(r1, r2, 10.0, "trajectory")]
    [[2.0, -9.0, 11.0, 0.0], [1.0, -10.0, 11.0, 0.0]]
    """
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {CREDITS}, not {credit!r}")
    shaped = shaped_reward(r1, r2, alpha)
    return (r1 + shaped if credit == "trajectory" else r1), shaped


def baseline_advantage(rewards: torch.Tensor, scale: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE advantage with a leave-one-out mean baseline:

        A_i = r_i − mean_{j≠i} r_j            (÷ (std(r) + eps) with scale=True)

    The leave-one-out mean keeps the estimator unbiased (the baseline does not depend on the
    sample it is subtracted from) while removing most of the variance of raw rewards.
    `scale` divides by the batch std (a batch of equal rewards then gives zeros), making the
    step size independent of the reward's scale (α = 10 vs α = 0). A batch of one gives
    zeros."""
    n = rewards.numel()
    if n < 2:
        return torch.zeros_like(rewards)
    return _scaled(rewards - (rewards.sum() - rewards) / (n - 1), rewards, scale, eps)


def _scaled(adv: torch.Tensor, rewards: torch.Tensor, scale: bool, eps: float = 1e-6) -> torch.Tensor:
    """`adv` ÷ (std(rewards) + eps) with `scale` (zeros where the rewards are all equal)."""
    if not scale:
        return adv
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return torch.zeros_like(adv) if std < eps else adv / (std + eps)


def attempt_advantages(credit: tuple[torch.Tensor, torch.Tensor], groups: torch.Tensor | None = None,
                       scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each episode's advantages for y1 and y2 from their credit (`attempt_credit`).

    Without `groups`: each attempt's credit with the leave-one-out baseline of the batch.
    With `groups` (episode i's y1; several second attempts share one, `y2_samples=K`): y2's
    baseline is the leave-one-out mean of its own group, so a fix and a copy are compared on
    the same y1 and r̂(y2)'s −α·r(y1) cancels (turn-independent, as PAG does); a group of one
    gets no y2 advantage. y1's credit is its group's mean (r(y1) itself under the default
    credit; the mean of the K returns-to-go under `credit=trajectory`), baselined by the
    leave-one-out mean over the other groups, each group counted once. A group's episodes
    share its y1 advantage: the loss's mean over episodes then weighs every y1 equally.
    Both are unbiased (tests/training/test_losses.py, an exact bandit); a batch baseline over
    episodes that share a y1 is not, for y1.

    >>> c1, c2 = torch.tensor([1., 1., 0., 0.]), torch.tensor([1., -10., 11., 0.])
    >>> [a.tolist() for a in attempt_advantages((c1, c2), torch.tensor([0, 0, 1, 1]))]
    [[1.0, 1.0, -1.0, -1.0], [11.0, -11.0, 11.0, -11.0]]
    """
    c1, c2 = credit
    if groups is None:
        return baseline_advantage(c1, scale), baseline_advantage(c2, scale)
    ids, index = torch.unique(groups, return_inverse=True)

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(len(ids)).index_add_(0, index.to(x.device), x)

    counts = per_group(torch.ones_like(c2))
    a1 = baseline_advantage(per_group(c1) / counts.to(c1), scale)[index]  # each group's y1 once
    size = counts[index]
    a2 = torch.where(size > 1, c2 - (per_group(c2)[index] - c2) / (size - 1).clamp(min=1), torch.zeros_like(c2))
    return a1, _scaled(a2, c2, scale)


def reinforce_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """−mean_i A_i · Σ_t w_t log π(y_i,t): the REINFORCE surrogate (its gradient is the policy
    gradient; advantages are constants). `weight` (B, T), constant: per-token importance
    weights for tokens another policy sampled (`truncated_is_weights`); none = on-policy."""
    if weight is not None:
        logp = logp * weight.detach()
    return -(adv.detach() * (logp * mask).sum(-1)).mean()


class ScoreStats(NamedTuple):
    """The parts of `score_objective`, per attempt (y1, y2), detached, for the log."""

    pg: tuple[float, float]       # the policy-gradient (REINFORCE) terms
    penalty: tuple[float, float]  # β · the KL loss terms
    kl: tuple[float, float]       # the KL estimate itself (what β multiplies)

    def named(self) -> dict[str, float]:
        """{"pg_t1": …, "pg_t2": …, "penalty_t1": …, …}: the log's names."""
        return {f"{name}_t{k}": v for name, values in self._asdict().items() for k, v in enumerate(values, start=1)}


def score_objective(logp: torch.Tensor, ref: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
                    advantages: tuple[torch.Tensor, torch.Tensor], betas: tuple[float, float],
                    weights: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                    scale: float = 1.0) -> tuple[torch.Tensor, ScoreStats]:
    """SCoRe's loss on rows of whole episodes (x, y1, I, y2), to minimise:

        L = Σ_{k ∈ {1,2}} scale · [ REINFORCE(logp, mask_k, A_k, w_k) + β_k · KL(π ‖ π_ref)(mask_k) ]

    logp, ref     [B, T]  log-probabilities of each row's tokens under the learner / the reference
    masks         2 × [B, T] bool: the tokens of y1 / of y2
    advantages    2 × [B]  each row's episode's advantage for y1 / y2 (the stage's credit)
    betas         (β for y1, β for y2): Stage I (β2, 0), Stage II (β1, β1)
    weights       2 × [B, T] truncated importance weights of stale samples, or None
    scale         this micro-batch's share of the batch (the terms are summed over micro-batches)

    Pure: no forward pass, no rank, no rounding — `recipes/score.py` runs those around it.

    >>> lp = torch.log(torch.tensor([[0.5, 0.5]])); m = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    >>> loss, stats = score_objective(lp, lp, m, (torch.tensor([1.0]), torch.tensor([0.0])), (0.1, 0.1))
    >>> round(float(loss), 4), stats.kl
    (0.6931, (0.0, 0.0))
    """
    loss, parts = 0.0, {"pg": [], "penalty": [], "kl": []}
    for mask, a, beta, w in zip(masks, advantages, betas, weights):
        pg = reinforce_loss(logp, mask, a, w) * scale
        penalty = beta * kl_loss(logp, ref, mask).mean() * scale
        loss = loss + pg + penalty
        kl = kl_estimate(logp, ref, mask).mean() * scale
        for name, v in (("pg", pg), ("penalty", penalty), ("kl", kl)):
            parts[name].append(float(v.detach()))
    return loss, ScoreStats(**{k: tuple(v) for k, v in parts.items()})


def behaviour_logprobs(target: torch.Tensor, mask: torch.Tensor, sampled: list[tuple | None], decode=None
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The log-probabilities the sampling policy reported for its tokens, placed on the (B, T)
    rows' tokens they belong to, matched by identity: sampled[i] = (tokens, logprobs), the
    sampler's token ids (or its tokens as text, compared with `decode([id])` of the row's
    ids), must be row i's first len(tokens) masked tokens (`target`, the row's ids aligned
    with the mask); the mask may go on past them (an end of turn the sampler did not
    report). A row whose tokens differ — text re-tokenised otherwise than it was sampled —
    or that reported no tokens gets none: its neighbour's log-probabilities would be wrong.
    A row with no masked tokens (it holds another attempt) is skipped. Returns the values,
    where they are, and how many rows with log-probabilities did not match.

    >>> t, m = torch.tensor([[0, 7, 8, 1]]), torch.tensor([[False, True, True, True]])
    >>> behaviour_logprobs(t, m, [([7, 8], [-0.5, -1.0])])
    (tensor([[ 0.0000, -0.5000, -1.0000,  0.0000]], dtype=torch.float64), tensor([[False,  True,  True, False]]), 0)
    >>> behaviour_logprobs(t, m, [([8, 7], [-0.5, -1.0])])[2]  # other tokens: not placed, counted
    1
    >>> behaviour_logprobs(t, m & False, [([7, 8], [-0.5, -1.0])])[2]  # this attempt is in another row
    0
    """
    values = torch.zeros(mask.shape, dtype=torch.float64)
    where = torch.zeros(mask.shape, dtype=torch.bool)
    unmatched = 0
    for row, entry in enumerate(sampled):
        tokens, lps = entry if entry is not None else (None, None)
        pos = mask[row].nonzero()[:, 0].cpu()
        if not lps or not len(pos):
            continue
        have = target[row].cpu()[pos[: len(lps)]].tolist()
        if isinstance(next(iter(tokens or []), None), str):
            have = [decode([i]) for i in have] if decode is not None else None
        if tokens is None or len(tokens) != len(lps) or have != list(tokens):
            unmatched += 1
            continue
        values[row, pos[: len(lps)]] = torch.tensor(lps, dtype=torch.float64)
        where[row, pos[: len(lps)]] = True
    return values, where, unmatched


def truncated_is_weights(logp: torch.Tensor, behaviour: torch.Tensor, where: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Per-token importance weights w_t = min(π(y_t) / μ(y_t), cap) for tokens sampled by a
    stale policy μ (its log-probs `behaviour`, at `where`; 1 elsewhere), without grad.

    With them REINFORCE on μ's samples estimates the gradient for π: Σ_y μ(y)·(π(y)/μ(y))·
    A(y)∇log π(y) = ∇Σ_y π(y)A(y) (tests/training/test_losses.py, on an exact categorical). The cap
    trades that bias for bounded variance (truncated IS, as IMPALA's ρ̄ and TIS in verl);
    per token rather than per sequence, as PPO-style trainers weight tokens."""
    with torch.no_grad():
        ratio = torch.exp(logp.detach().double() - behaviour.to(logp.device)).clamp(max=cap)
        return torch.where(where.to(logp.device), ratio, torch.ones_like(ratio)).to(logp.dtype)


def spin_loss(logp_gold: torch.Tensor, logp_self: torch.Tensor, ref_gold: torch.Tensor, ref_self: torch.Tensor,
              lam: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPIN (arXiv 2401.01335) per pair, from summed sequence log-probabilities:

        ℓ = −log σ( λ·[ (log pθ(y|x) − log pθt(y|x)) − (log pθ(y'|x) − log pθt(y'|x)) ] )

    y the gold response, y' the opponent's (pθt, the previous iterate, frozen). It is DPO's
    sigmoid loss with the opponent as the reference and gold as "chosen". Returns the mean
    loss and the implicit rewards λ·(log pθ − log pθt) of gold and self, per pair."""
    r_gold = lam * (logp_gold - ref_gold.detach())
    r_self = lam * (logp_self - ref_self.detach())
    return -torch.nn.functional.logsigmoid(r_gold - r_self).mean(), r_gold.detach(), r_self.detach()


def sampled_logprob_ratio(logp: torch.Tensor, values: torch.Tensor, where: torch.Tensor) -> tuple[float, float, int]:
    """The continuous sync check on the sampled tokens whose log-probability the server
    reported (`values` at `where`, placed by `losses.behaviour_logprobs`): Σ r and
    Σ (r − 1 − log r) with r = π_learner / π_served, and how many tokens.

    The mean of r is about 1.0 when learner and server agree — but also, in expectation,
    when they do not (E_{y~π_served}[π_learner(y)/π_served(y)] = Σ π_learner = 1), so it
    shows a mismatch only through its noise. The mean of r − 1 − log r estimates
    KL(π_served ‖ π_learner) (Schulman's k3): ≥ 0, zero only when they agree; that is the
    number to alarm on. It catches on every step's real samples what the canary catches at
    sync time: a server that samples from another model than the learner's.

    >>> lp = torch.log(torch.tensor([[0.5, 0.25, 0.1]], dtype=torch.float64))
    >>> sampled_logprob_ratio(lp, lp.clone(), torch.tensor([[True, True, False]]))
    (2.0, 0.0, 2)
    >>> [round(x, 4) for x in sampled_logprob_ratio(lp, lp / 2, torch.tensor([[True, False, False]]))]
    [0.7071, 0.0537, 1]
    """
    d = (logp.detach().double().cpu() - values)[where]
    return float(d.exp().sum()), float((d.exp() - 1 - d).sum()), int(where.sum())


class SampledCheck:
    """What the sampler reported for the tokens a step trains on, over its micro-batches:
    `served[e]` is row-episode e's (y1, y2) as (tokens, log-probs) (None: not asked).
    `weights` places them on a micro-batch's rows (`losses.behaviour_logprobs`; `decode`
    compares tokens reported as text) and returns each attempt's importance weights when
    `is_cap` is set (an older adapter sampled the batch: `losses.truncated_is_weights`),
    else None; `parts` gives the log's `logprob_ratio`, `logprob_kl` (the learner/server
    check, `sampled_logprob_ratio`), `is_weight` (the mean weight) and `unmatched_rows`
    (attempts whose tokens differ from the trained ones, left unweighted)."""

    def __init__(self, served: list[tuple] | None, decode=None, is_cap: float | None = None):
        self.served, self.decode, self.is_cap = served, decode, is_cap
        self.sums = [0.0, 0.0, 0, 0, 0.0, 0]  # Σ ratio, Σ k3, tokens, unmatched, Σ weight, weighted tokens

    def weights(self, logp: torch.Tensor, target: torch.Tensor, masks: tuple, episodes: list[int]) -> tuple:
        if self.served is None:
            return (None,) * len(masks)
        out = []
        for k, mask in enumerate(masks):
            values, where, unmatched = behaviour_logprobs(target, mask, [self.served[e][k] for e in episodes],
                                                          self.decode)
            w = truncated_is_weights(logp, values, where, self.is_cap) if self.is_cap else None
            seen = (float((w * mask).sum()), int(mask.sum())) if w is not None else (0.0, 0)
            for i, v in enumerate((*sampled_logprob_ratio(logp, values, where), unmatched, *seen)):
                self.sums[i] += v
            out.append(w)
        return tuple(out)

    def parts(self, total: bool = False) -> dict:
        """The log's fields; with `total`, summed over the ranks first."""
        ratio, kl, n, unmatched, w, wn = (distributed.total(x) for x in self.sums) if total else self.sums
        out = {"is_weight": round(w / wn, 5)} if wn else {}
        if n:
            out |= {"logprob_ratio": round(ratio / n, 5), "logprob_kl": round(kl / n, 6)}
        return out | ({"unmatched_rows": int(unmatched)} if self.served is not None else {})
