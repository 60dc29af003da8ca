"""The policy-gradient pieces against values computed by hand."""

import math

import pytest
import torch

from selfevolve.training.losses import (
    attempt_advantages,
    attempt_credit,
    baseline_advantage,
    behaviour_logprobs,
    kl_estimate,
    kl_loss,
    reinforce_loss,
    shaped_reward,
    truncated_is_weights,
)


def test_k3_kl_value_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding
    # token 1: d = log(0.25/0.5) = -log 2 -> 0.5 + log 2 - 1; token 2: d = 0 -> 0
    expected = 0.5 + math.log(2) - 1
    assert kl_estimate(logp, ref, mask).item() == pytest.approx(expected, abs=1e-6)
    assert kl_estimate(ref, ref, mask).item() == 0.0


def test_k3_is_an_unbiased_kl_estimate():
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True)
    est = kl_estimate(p.log()[x][:, None], q.log()[x][:, None], torch.ones(len(x), 1)).mean()
    assert est.item() == pytest.approx((p * (p / q).log()).sum().item(), abs=5e-3)


def _categorical():
    torch.manual_seed(1)
    theta, ref = torch.randn(6, requires_grad=True), torch.log_softmax(torch.randn(6), -1)
    return theta, ref


def _expected_grad(estimator, theta, ref):
    """∇ of E_{y~π}[estimator(y)] with the sampling distribution held fixed: exactly what a
    loss built from the estimator on samples of π gives on average."""
    logp = torch.log_softmax(theta, -1)
    per_y = estimator(logp[:, None], ref[:, None], torch.ones(6, 1))
    (g,) = torch.autograd.grad((logp.exp().detach() * per_y).sum(), theta)
    return g


def test_the_kl_loss_has_the_gradient_of_kl_pi_to_ref():
    theta, ref = _categorical()
    logp = torch.log_softmax(theta, -1)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)  # ∇ KL(π ‖ π_ref)
    assert torch.allclose(_expected_grad(kl_loss, theta, ref), exact, atol=1e-6)


def test_k3_as_a_loss_would_follow_the_other_kl():
    """Why k3 is for the log only: as a loss its expected gradient is ∇KL(π_ref ‖ π)."""
    theta, ref = _categorical()

    def k3(logp, ref, mask):  # k3 with gradients, as the old code used it
        d = (ref - logp) * mask
        return ((torch.exp(d) - d - 1) * mask).sum(-1)

    logp = torch.log_softmax(theta, -1)
    (reverse,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta, retain_graph=True)
    (forward,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)
    g = _expected_grad(k3, theta, ref)
    assert torch.allclose(g, forward, atol=1e-6) and not torch.allclose(g, reverse, atol=1e-2)


def _bandit_gradient(alpha: float, credit: str) -> torch.Tensor:
    """Exact expected policy gradient of SCoRe Stage II's surrogate on a two-attempt bandit:
    y1 is right with p1 = σ(a); y2 is right with σ(b_right) after a right y1 and σ(b_wrong)
    after a wrong one. Every outcome is enumerated and weighted by its probability."""
    theta = torch.tensor([0.3, 1.0, -0.5], requires_grad=True)  # a, b_right, b_wrong
    p1 = torch.sigmoid(theta[0])
    total = 0.0
    for y1 in (1.0, 0.0):
        p2 = torch.sigmoid(theta[1] if y1 else theta[2])
        for y2 in (1.0, 0.0):
            lp1 = torch.log(p1 if y1 else 1 - p1)
            lp2 = torch.log(p2 if y2 else 1 - p2)
            c1, c2 = attempt_credit(torch.tensor([y1]), torch.tensor([y2]), alpha, credit)
            prob = (lp1 + lp2).exp().detach()
            total = total + prob * (c1[0] * lp1 + c2[0] * lp2)
    (g,) = torch.autograd.grad(total, theta)
    return g


def test_trajectory_credit_is_the_gradient_of_eq_4_and_alpha_changes_its_direction():
    theta = torch.tensor([0.3, 1.0, -0.5], requires_grad=True)
    p1, pr, pw = torch.sigmoid(theta)
    for alpha in (0.0, 10.0):  # E[r1 + r̂2] = E[(1 - α) r1 + (1 + α) r2] in closed form
        objective = (1 - alpha) * p1 + (1 + alpha) * (p1 * pr + (1 - p1) * pw)
        (exact,) = torch.autograd.grad(objective, theta, retain_graph=True)
        assert torch.allclose(_bandit_gradient(alpha, "trajectory"), exact, atol=1e-6)
    g0, g10 = _bandit_gradient(0.0, "trajectory"), _bandit_gradient(10.0, "trajectory")
    assert g0[0] > 0 > g10[0]  # α = 10 pushes y1 toward answers the second attempt fixes
    assert torch.nn.functional.cosine_similarity(g0, g10, dim=0) < 0.9


def test_instantaneous_credit_keeps_each_attempts_direction_whatever_alpha():
    """The paper's credit (γ = 0): y1 follows ∇E[r(y1)] alone, and y2 ∇E[r(y2) | y1] scaled by
    (1 + α): the bonus changes the second attempt's step size, never y1's learning."""
    g0, g10 = _bandit_gradient(0.0, "instantaneous"), _bandit_gradient(10.0, "instantaneous")
    theta = torch.tensor([0.3, 1.0, -0.5], requires_grad=True)
    p1, pr, pw = torch.sigmoid(theta)
    (d_r1,) = torch.autograd.grad(p1, theta, retain_graph=True)  # y1: ∇E[r1] alone ...
    (d_r2,) = torch.autograd.grad(p1 * pr + (1 - p1) * pw, theta)  # ... y2: ∇E[r2] with y1 held
    assert torch.allclose(g0, torch.stack([d_r1[0], d_r2[1], d_r2[2]]), atol=1e-6)
    assert torch.allclose(g10[0], g0[0], atol=1e-6) and g10[0] > 0  # a right y1 is still learned
    assert torch.allclose(g10[1:], 11 * g0[1:], atol=1e-5)


def _grouped_bandit(alpha: float, grouped: bool, k: int = 2) -> torch.Tensor:
    """The exact expected gradient of SCoRe Stage II's estimate (the paper's credit)
    on the bandit above, for a batch of two first attempts with `k` second attempts each:
    every outcome enumerated, advantages by `attempt_advantages` with (or without) the
    groups."""
    import itertools

    theta = torch.tensor([0.3, 1.0, -0.5], requires_grad=True)
    grads, probs = [], []
    for y1s in itertools.product((1.0, 0.0), repeat=2):
        for y2s in itertools.product((1.0, 0.0), repeat=2 * k):
            p1 = torch.sigmoid(theta[0])
            r1 = torch.tensor([y1s[0]] * k + [y1s[1]] * k)
            r2 = torch.tensor(y2s)
            lp1 = torch.stack([torch.log(p1 if y else 1 - p1) for y in r1.tolist()])
            p2 = torch.stack([torch.sigmoid(theta[1] if y else theta[2]) for y in r1.tolist()])
            lp2 = torch.where(r2 == 1, torch.log(p2), torch.log(1 - p2))
            a1, a2 = attempt_advantages(attempt_credit(r1, r2, alpha),
                                        torch.tensor([0] * k + [1] * k) if grouped else None)
            surrogate = (a1 * lp1 + a2 * lp2).mean()
            probs.append(float((lp1[[0, k]].sum() + lp2.sum()).exp().detach()))  # each y1 drawn once
            (g,) = torch.autograd.grad(surrogate, theta)
            grads.append(g)
    return (torch.tensor(probs)[:, None] * torch.stack(grads)).sum(0)


def test_turn_independent_baselines_are_unbiased_where_episodes_share_a_first_attempt():
    """`y2_samples`: with each second attempt baselined within its own group and each y1 once
    over the groups, the expected gradient is exactly the paper's credit's (y1: ∇E[r1]; y2:
    (1 + α)·∇E[r2 | y1]). A batch baseline over the episodes is not, for y1: an episode's
    baseline then holds its own y1's reward through its siblings."""
    exact = _bandit_gradient(10.0, "instantaneous")
    grouped, batch = _grouped_bandit(10.0, True), _grouped_bandit(10.0, False)
    assert torch.allclose(grouped, exact, atol=1e-5)
    assert torch.allclose(batch[1:], exact[1:], atol=1e-5)  # a batch baseline is unbiased for y2 ...
    assert not torch.allclose(batch[0], exact[0], atol=1e-2)  # ... not for a y1 its own episodes share


def test_shaped_reward_table():
    r1 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    r2 = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert shaped_reward(r1, r2, 10.0).tolist() == [1.0, -10.0, 11.0, 0.0]  # keep, c2i, i2c, i2i
    assert shaped_reward(r1, r2, 0.0).tolist() == r2.tolist()


def test_leave_one_out_baseline_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # leave-one-out means: 1/3, 2/3, 2/3, 1/3; std (unbiased) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert baseline_advantage(r, scale=True).tolist() == pytest.approx([(2 / 3) / s, (-2 / 3) / s, (-2 / 3) / s,
                                                                        (2 / 3) / s], abs=1e-5)
    assert baseline_advantage(torch.ones(5), scale=True).tolist() == [0.0] * 5
    assert baseline_advantage(r).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-6)
    assert baseline_advantage(torch.tensor([3.0])).tolist() == [0.0]


def test_reinforce_gradient_is_advantage_times_score_function():
    logits = torch.zeros(2, 3, requires_grad=True)
    tokens = torch.tensor([[0], [2]])
    logp = torch.log_softmax(logits, -1).gather(1, tokens)  # (2, 1)
    loss = reinforce_loss(logp, torch.ones(2, 1), torch.tensor([2.0, -1.0]))
    loss.backward()
    # d/dlogits of -mean(A * log softmax[tok]) = -A/2 * (onehot - softmax)
    soft = torch.full((3,), 1 / 3)
    expected = torch.stack([-1.0 * (torch.tensor([1.0, 0, 0]) - soft), 0.5 * (torch.tensor([0, 0, 1.0]) - soft)])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_importance_weighted_reinforce_on_stale_samples_has_the_on_policy_gradient():
    """Samples of a stale policy μ, weighted by π/μ: the expected REINFORCE gradient equals
    ∇E_π[A], exactly (an uncapped weight); without the weights it is μ's gradient, not π's;
    the cap bounds every weight and keeps the direction's sign on this case."""
    theta, stale = _categorical()  # π = softmax(θ), the learner; μ = exp(stale), the sampler
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    logp = torch.log_softmax(theta, -1)
    (exact,) = torch.autograd.grad((logp.exp() * adv).sum(), theta)  # ∇ E_π[A]

    def expected_grad(cap):
        logp = torch.log_softmax(theta, -1)[:, None]
        values, where, _ = behaviour_logprobs(torch.arange(6)[:, None], torch.ones(6, 1, dtype=torch.bool),
                                              [([i], [x]) for i, x in enumerate(stale.tolist())])
        w = truncated_is_weights(logp, values, where, cap) if cap else None
        per_y = torch.stack([reinforce_loss(logp[i : i + 1], torch.ones(1, 1), adv[i : i + 1],
                                            None if w is None else w[i : i + 1]) for i in range(6)])
        (g,) = torch.autograd.grad((stale.exp() * per_y).sum(), theta)  # E_{y~μ}
        return -g, w

    g, w = expected_grad(float("inf"))
    assert torch.allclose(g, exact, atol=1e-6)
    g, _ = expected_grad(None)
    assert not torch.allclose(g, exact, atol=1e-2)  # uncorrected, stale samples give another gradient
    g, w = expected_grad(1.5)
    assert w.max() <= 1.5 and (w < (logp.detach() - stale).exp()[:, None] - 1e-6).any()
    assert torch.dot(g, exact) > 0


def test_spin_loss_by_hand():
    from selfevolve.training.losses import spin_loss

    lg, ls = torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -1.0])
    rg, rs = torch.tensor([-2.5, -1.0]), torch.tensor([-2.0, -1.0])
    loss, r_gold, r_self = spin_loss(lg, ls, rg, rs, lam=0.1)
    # pair 1: 0.1 * ((-2 + 2.5) - (-3 + 2)) = 0.15; pair 2: identical responses -> 0
    expected = (-math.log(1 / (1 + math.exp(-0.15))) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert r_gold.tolist() == pytest.approx([0.05, 0.0]) and r_self.tolist() == pytest.approx([-0.1, 0.0])
    # TRL's DPOTrainer (1.x) computes its sigmoid loss inline as -logsigmoid(beta * delta_score)
    delta = (lg - rg) - (ls - rs)
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(0.1 * delta)).mean().item(), abs=1e-7)


def test_spin_gradient_raises_gold_and_lowers_self():
    from selfevolve.training.losses import spin_loss

    lg = torch.tensor([-2.0], requires_grad=True)
    ls = torch.tensor([-2.0], requires_grad=True)
    spin_loss(lg, ls, torch.tensor([-2.0]), torch.tensor([-2.0]), lam=0.1)[0].backward()
    assert lg.grad.item() == pytest.approx(-0.05) and ls.grad.item() == pytest.approx(0.05)
