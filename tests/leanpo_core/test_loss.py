"""Hand-worked checks of the objectives in leanpo_core.loss (docs/method.md section 2).

The shared batch (two pairs), used throughout:
    pair 1: chosen  logp sum -2.0 over 4 tokens -> rbar_w = -0.5
            rejected logp sum -3.0 over 2 tokens -> rbar_l = -1.5      Delta_1 = +1.0
    pair 2: chosen  logp sum -6.0 over 3 tokens -> rbar_w = -2.0
            rejected logp sum -2.0 over 2 tokens -> rbar_l = -1.0      Delta_2 = -1.0
With beta = 2, gamma = 0.5 the margin logits are beta*Delta - gamma = 1.5 and -2.5.
Write sp(x) = -log sigmoid(x) = log(1 + exp(-x)).
"""

import math

import pytest
import torch

from leanpo_core import loss
from leanpo_core.loss import dpo_loss, leanpo_loss, simpo_loss


def sp(x: float) -> float:
    return math.log1p(math.exp(-x))


def batch(requires_grad: bool = False):
    chosen = torch.tensor([-2.0, -6.0], dtype=torch.float64, requires_grad=requires_grad)
    rejected = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=requires_grad)
    return chosen, torch.tensor([4.0, 3.0], dtype=torch.float64), rejected, torch.tensor([2.0, 2.0], dtype=torch.float64)


def test_leanpo_symmetric_hand_worked():
    """d = 0 gates pair 2 only (Delta_2 < 0), so eps_2 = 0.1 and eps_1 = 0.
    L_1 = sp(1.5)                                  = 0.2014132779827524
    L_2 = 0.9 sp(-2.5) + 0.1 sp(-beta*Delta_2 - gamma) = 0.9 sp(-2.5) + 0.1 sp(1.5) = 2.34114208866157
    CE  = -(-2 - 6) / (4 + 3) = 8/7
    loss = (L_1 + L_2) / 2 + 0.5 * 8/7 = 1.8427062547507327
    """
    out = leanpo_loss(*batch(), beta=2.0, gamma=0.5, eps=0.1, d=0.0, sft_weight=0.5)
    assert out.losses.tolist() == pytest.approx([0.2014132779827524, 2.34114208866157], abs=1e-6)
    assert out.loss.item() == pytest.approx(1.8427062547507327, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-1.0, -4.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-3.0, -2.0])
    m = out.metrics
    assert m["label_smoothing/active_fraction"] == pytest.approx(0.5)
    assert m["loss/sft"] == pytest.approx(8 / 7)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(((-1 + 3) + (-4 + 2)) / 2)
    assert m["logps/chosen"] == pytest.approx((-0.5 - 2.0) / 2)
    assert m["logps/rejected"] == pytest.approx((-1.5 - 1.0) / 2)


def test_leanpo_conservative_form():
    """The conservative form's second term is sp(-(beta*Delta - gamma)) = sp(2.5) on pair 2:
    L_2 = 0.9 sp(-2.5) + 0.1 sp(2.5) = 2.3288897342925496; loss = (L_1 + L_2)/2 + 4/7 = 1.8365800775662224.
    """
    out = leanpo_loss(*batch(), smoothing="conservative")
    assert out.losses[1].item() == pytest.approx(2.3288897342925496, abs=1e-6)
    assert out.loss.item() == pytest.approx(1.8365800775662224, abs=1e-6)


def test_gate_threshold_moves_pairs_in_and_out():
    """d = -2 gates nothing (both Delta >= -2); d = 2 gates both; d = inf is constant smoothing.
    With both gated, L_1 = 0.9 sp(1.5) + 0.1 sp(-2*1 - 0.5) = 0.9 sp(1.5) + 0.1 sp(-2.5).
    """
    none = leanpo_loss(*batch(), d=-2.0)
    assert none.metrics["label_smoothing/active_fraction"] == 0.0
    assert none.losses[1].item() == pytest.approx(sp(-2.5), abs=1e-6)
    both = leanpo_loss(*batch(), d=2.0)
    assert both.metrics["label_smoothing/active_fraction"] == 1.0
    assert both.losses[0].item() == pytest.approx(0.9 * sp(1.5) + 0.1 * sp(-2.5), abs=1e-6)
    always = leanpo_loss(*batch(), d=math.inf)
    assert torch.allclose(always.losses, both.losses)


def test_eps_zero_and_no_sft_is_simpo():
    """eps = 0, lambda_sft = 0: L_i = sp(beta*Delta_i - gamma): sp(1.5) = 0.20141, sp(-2.5) = 2.57889, mean 1.39015."""
    lean = leanpo_loss(*batch(), eps=0.0, sft_weight=0.0)
    simpo = simpo_loss(*batch(), beta=2.0, gamma=0.5)
    assert simpo.loss.item() == pytest.approx(1.390151506137651, abs=1e-6)
    assert torch.allclose(lean.losses, simpo.losses, atol=1e-12)
    assert lean.loss.item() == pytest.approx(simpo.loss.item(), abs=1e-12)


def test_dpo_hand_worked():
    """Reference sums -2.5 and -2.5: r_w = 0.1 * (-2 + 2.5) = 0.05, r_l = 0.1 * (-3 + 2.5) = -0.05 on pair 1,
    so L_1 = sp(0.1) = 0.6443966600735709.
    """
    chosen, ct, rejected, rt = batch()
    ref = torch.tensor([-2.5, -2.5], dtype=torch.float64)
    out = dpo_loss(chosen, ct, rejected, rt, ref, ref, beta=0.1)
    assert out.losses[0].item() == pytest.approx(0.6443966600735709, abs=1e-6)
    assert out.chosen_rewards[0].item() == pytest.approx(0.05)


def test_gradients_finite_and_gate_carries_no_gradient():
    """The gate is a hard indicator: moving d so it still splits the pairs identically leaves the gradient unchanged."""
    grads = []
    for d in (0.0, 0.5):
        chosen, ct, rejected, rt = batch(requires_grad=True)
        leanpo_loss(chosen, ct, rejected, rt, d=d).loss.backward()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
        grads.append((chosen.grad.clone(), rejected.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


def test_displacement_monitor():
    """displacement/chosen = mean(rbar_now - rbar_before) = mean(-0.5 - (-0.4), -2.0 - (-1.0)) = -0.55."""
    metrics = loss.displacement_metrics(torch.tensor([-0.5, -2.0], dtype=torch.float64),
                                        torch.tensor([-1.5, -1.0], dtype=torch.float64),
                                        torch.tensor([-0.4, -1.0], dtype=torch.float64),
                                        torch.tensor([-1.5, -1.0], dtype=torch.float64))
    assert metrics["displacement/chosen"] == pytest.approx(-0.55)
    assert metrics["displacement/rejected"] == pytest.approx(0.0)
    assert loss.displacement_metrics(torch.zeros(2), torch.zeros(2), None, None) == {}


def test_sft_loss_by_hand():
    """Chosen sums (-2, -6) over (2, 3) tokens: CE = 8 / 5 = 1.6; per-pair losses -rbar = (1, 2); a rejected side
    with zero tokens (not run) reports no rejected log-probs."""
    out = loss.sft_loss(torch.tensor([-2.0, -6.0]), torch.tensor([2, 3]), torch.zeros(2),
                        torch.zeros(2, dtype=torch.long))
    assert out.loss.item() == pytest.approx(1.6)
    assert out.losses.tolist() == pytest.approx([1.0, 2.0])
    assert out.metrics == pytest.approx({"loss": 1.6, "loss/sft": 1.6, "logps/chosen": -1.5})
    with_rejected = loss.sft_loss(torch.tensor([-2.0, -6.0]), torch.tensor([2, 3]), torch.tensor([-3.0, -1.0]),
                                  torch.tensor([1, 1]))
    assert with_rejected.metrics["logps/rejected"] == pytest.approx(-2.0)
    assert with_rejected.loss.item() == pytest.approx(1.6)
