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


def baseline_advantage(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE advantage with a leave-one-out mean baseline, scaled by the batch's std:

        A_i = (r_i − mean_{j≠i} r_j) / (std(r) + eps)

    The leave-one-out mean keeps the estimator unbiased (the baseline does not depend on the
    sample it is subtracted from); the std scaling makes the step size independent of the
    reward's scale (α=10 vs α=0). A batch where every reward is equal gives zeros."""
    n = rewards.numel()
    if n < 2:
        return torch.zeros_like(rewards)
    loo = (rewards.sum() - rewards) / (n - 1)
    std = rewards.std()
    if std < eps:
        return torch.zeros_like(rewards)
    return (rewards - loo) / (std + eps)


def reinforce_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """−mean_i A_i · Σ_t log π(y_i,t): the REINFORCE surrogate (its gradient is the policy
    gradient; advantages are constants)."""
    return -(adv.detach() * (logp * mask).sum(-1)).mean()
