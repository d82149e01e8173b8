"""Preference losses pinned to values derived by hand from the papers' formulas."""
import math

import pytest
import torch

from nemo_rlhf.algorithms.dpo import bradley_terry_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss

T = torch.tensor
ls = lambda x: math.log(1 / (1 + math.exp(-x)))      # log sigma(x)


def test_first_step_loss_is_ln2_when_policy_equals_reference():
    p = T([-5.0, -7.0]), T([-6.0, -4.0])
    losses, rc, rr = dpo_loss(*p, *p, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert rc.tolist() == [0.0, 0.0] and rr.tolist() == [0.0, 0.0]


def test_sigmoid_and_label_smoothing_by_hand():
    # h = (-1 - -3) - (-2 - -2) = 2 ; beta 0.5 -> beta h = 1
    args = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
    losses, rc, rr = dpo_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(-ls(1.0))
    assert rc.item() == pytest.approx(0.5 * (-1 + 2)) and rr.item() == pytest.approx(0.5 * (-3 + 2))
    losses, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(-0.9 * ls(1.0) - 0.1 * ls(-1.0))


def test_ipo_hinge_robust_by_hand():
    args = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))      # h = 2
    assert dpo_loss(*args, beta=0.25, loss_type="ipo")[0].item() == pytest.approx((2 - 1 / 0.5) ** 2)  # 0
    assert dpo_loss(*args, beta=0.1, loss_type="ipo")[0].item() == pytest.approx((2 - 5) ** 2)
    assert dpo_loss(*args, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)       # 1 - 0.5
    assert dpo_loss(*args, beta=1.0, loss_type="hinge")[0].item() == 0.0
    eps = 0.2
    expected = (-(1 - eps) * ls(1.0) + eps * ls(-1.0)) / (1 - 2 * eps)
    assert dpo_loss(*args, beta=0.5, loss_type="robust", label_smoothing=eps)[0].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(*args, beta=0.5, loss_type="nope")


def test_simpo_orpo_kto_bt_by_hand():
    # SimPO: beta 2, gamma 0.5, avg logps -1 vs -1.5 -> logits 2 * 0.5 - 0.5 = 0.5
    assert simpo_loss(T([-1.0]), T([-1.5]), beta=2.0, gamma=0.5).item() == pytest.approx(-ls(0.5))
    # ORPO: p_w = e^-1, p_l = e^-2 ; log odds = log(p/(1-p))
    lo = math.log(math.exp(-1) / (1 - math.exp(-1))) - math.log(math.exp(-2) / (1 - math.exp(-2)))
    loss, log_odds = orpo_loss(T([-1.0]), T([-2.0]), chosen_nll=T([3.0]), lam=0.1)
    assert log_odds.item() == pytest.approx(lo) and loss.item() == pytest.approx(3.0 - 0.1 * ls(lo))
    # KTO: r = [1, -1], z0 = 0.5, beta 2 ; desirable: 1 - sigma(2 * 0.5) ; undesirable: 1 - sigma(2 * 1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))
    out = kto_loss(T([-1.0, -3.0]), T([-2.0, -2.0]), T([True, False]), kl=T(0.5), beta=2.0,
                   undesirable_weight=2.0)
    assert out.tolist() == pytest.approx([1 - sig(1.0), 2 * (1 - sig(3.0))])
    assert kto_loss(T([-1.0]), T([-2.0]), T([True]), kl=T(-3.0), beta=1.0).item() == pytest.approx(1 - sig(1.0))
    # Bradley-Terry
    loss, correct = bradley_terry_loss(T([2.0, 0.0]), T([1.0, 1.0]))
    assert loss.tolist() == pytest.approx([-ls(1.0), -ls(-1.0)]) and correct.tolist() == [1.0, 0.0]
