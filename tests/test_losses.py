"""The policy-gradient pieces against values computed by hand."""

import math

import pytest
import torch

from selfevolve.losses import baseline_advantage, kl_per_sequence, reinforce_loss, shaped_reward


def test_k3_kl_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding
    # token 1: d = log(0.25/0.5) = -log 2 -> 0.5 + log 2 - 1; token 2: d = 0 -> 0
    expected = 0.5 + math.log(2) - 1
    assert kl_per_sequence(logp, ref, mask).item() == pytest.approx(expected, abs=1e-6)
    assert kl_per_sequence(ref, ref, mask).item() == 0.0


def test_k3_is_an_unbiased_kl_estimate():
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True)
    est = kl_per_sequence(p.log()[x][:, None], q.log()[x][:, None], torch.ones(len(x), 1)).mean()
    assert est.item() == pytest.approx((p * (p / q).log()).sum().item(), abs=5e-3)


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


def test_spin_loss_by_hand():
    from selfevolve.losses import spin_loss

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
    from selfevolve.losses import spin_loss

    lg = torch.tensor([-2.0], requires_grad=True)
    ls = torch.tensor([-2.0], requires_grad=True)
    spin_loss(lg, ls, torch.tensor([-2.0]), torch.tensor([-2.0]), lam=0.1)[0].backward()
    assert lg.grad.item() == pytest.approx(-0.05) and ls.grad.item() == pytest.approx(0.05)
