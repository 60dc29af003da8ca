"""Policy-gradient pieces shared by the RL recipes (SCoRe): a per-token KL estimator,
SCoRe's shaped reward, the variance-reducing baseline, and the REINFORCE loss. Pure
tensor functions, tested against hand-computed values.

Shapes: `logp`, `ref_logp`, `mask` are (B, T) per-token values of the sampled tokens (the
output of `training.token_logprobs`), `adv` is (B,).
"""

from __future__ import annotations

import torch


def kl_per_sequence(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t KL estimate per sequence, with the "k3" estimator (Schulman, 2020)

        k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1  ≥ 0,

    an unbiased, non-negative, low-variance estimate of KL(π ‖ π_ref) from samples of π,
    differentiable in π's log-probs (the reference's are constants).
    """
    d = (ref_logp.detach() - logp) * mask
    return ((torch.exp(d) - d - 1) * mask).sum(-1)


def shaped_reward(r1: torch.Tensor, r2: torch.Tensor, alpha: float) -> torch.Tensor:
    """SCoRe Stage II reward of the second attempt: r(y2) + α·(r(y2) − r(y1)).

    With α = 10 a right→wrong change costs −10, wrong→right earns 11, and keeping a right
    answer earns 1: the policy is pushed toward correcting, not toward copying."""
    return r2 + alpha * (r2 - r1)


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
    adv = rewards - (rewards.sum() - rewards) / (n - 1)
    if scale:
        std = rewards.std()
        return torch.zeros_like(rewards) if std < eps else adv / (std + eps)
    return adv


def reinforce_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """−mean_i A_i · Σ_t log π(y_i,t): the REINFORCE surrogate (its gradient is the policy
    gradient; advantages are constants)."""
    return -(adv.detach() * (logp * mask).sum(-1)).mean()


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
