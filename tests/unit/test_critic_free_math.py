"""Critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) and the policy-loss knobs (DAPO's
decoupled clipping, GSPO's sequence ratio, k1/k2/k3 KL, loss aggregation, dynamic sampling),
each checked against values derived by hand in the comments."""
import math
from types import SimpleNamespace

import pytest
import torch

from nemo_rlhf.algorithms.advantages import (ADVANTAGE_ESTIMATORS, discounted_returns, estimate_advantages,
                                             grpo_advantages, rloo_advantages)
from nemo_rlhf.algorithms.policy_losses import (KL_ESTIMATORS, aggregate, clipped_surrogate, gspo_surrogate,
                                                informative_groups)

# group 0: rewards 1, 0, 0, 1 (mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3));
# group 1: 2, 2, 2 (all equal); group 2: one sample
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])


def test_grpo_and_dr_grpo_advantages():
    a = grpo_advantages(SCORES, GROUPS)
    # +-0.5 / sqrt(1/3) = +-0.8660; equal rewards and a lone sample: 0, not NaN
    assert a.tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0], abs=1e-5)
    assert not torch.isnan(a).any()
    assert grpo_advantages(SCORES, GROUPS, scale_by_std=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_rloo_leave_one_out_baseline():
    # r=1: the other three (0, 0, 1) average 1/3 -> 2/3; r=0: (1, 0, 1) average 2/3 -> -2/3
    a = rloo_advantages(SCORES, GROUPS)
    assert a.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])


def test_discounted_returns_for_reinforce_pp():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # gamma 0.5: row 0: G2 = 1, G1 = 0.5, G0 = 0.25; row 1: G1 = 1, G0 = 0.5 + 0.5 = 1, padding 0
    assert discounted_returns(r, m, 0.5).tolist() == [[0.25, 0.5, 1.0], [1.0, 1.0, 0.0]]


def test_estimator_table_rows_and_per_token_broadcast():
    assert {k: (v.needs_values, v.needs_groups, v.whiten) for k, v in ADVANTAGE_ESTIMATORS.items()} == {
        "gae": (True, False, None), "grpo": (False, True, None), "rloo": (False, True, None),
        "reinforce++": (False, False, True)}
    # per-token rewards: a KL penalty on each token plus the score on the last; the sequence score
    # is their sum (row 0: -0.1 - 0.1 + 1.2 = 1.0; row 1: 0.0), one group
    r = torch.tensor([[-0.1, -0.1, 1.2], [0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    hp = SimpleNamespace(grpo_scale="none", gamma=1.0)
    adv, ret = estimate_advantages("grpo", r, None, m, hp, groups=torch.tensor([7, 7]))
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]]))
    with pytest.raises(ValueError, match="grpo needs the prompt group"):
        estimate_advantages("grpo", r, None, m, hp)
    adv, _ = estimate_advantages("reinforce++", r, None, m, hp)
    assert torch.allclose(adv, torch.tensor([[1.0, 1.1, 1.2], [0.0, 0.0, 0.0]]))


def test_kl_estimators():
    lr = torch.tensor([math.log(2.0), 0.0])
    # k1 = log 2; k2 = 0.5 log^2 2; k3 = 1/2 - 1 + log 2; all 0 where pi = pi_ref
    assert KL_ESTIMATORS["k1"](lr).tolist() == pytest.approx([0.693147, 0.0], abs=1e-6)
    assert KL_ESTIMATORS["k2"](lr).tolist() == pytest.approx([0.240227, 0.0], abs=1e-6)
    assert KL_ESTIMATORS["k3"](lr).tolist() == pytest.approx([0.193147, 0.0], abs=1e-6)


def test_decoupled_clipping_dapo():
    m = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    # ratios 1.5, 0.5, 1.1 with A = +1, -1, +1; eps_low 0.2, eps_high 0.28:
    # 1.5 clipped to 1.28 -> -1.28 (high); 0.5 with A<0: max(0.5, 0.8) = 0.8 (low); 1.1 inside -> -1.1
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, st = clipped_surrogate(logp, old, adv, m, 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([-1.28, 0.8, -1.1])
    assert st["clipfrac_high"].item() == pytest.approx(1 / 3) and st["clipfrac_low"].item() == pytest.approx(1 / 3)
    # clip-higher: with eps_high 0.6 the 1.5 ratio is no longer clipped
    loss, st = clipped_surrogate(logp, old, adv, m, 0.2, 0.6)
    assert loss[0, 0].item() == pytest.approx(-1.5) and st["clipfrac_high"].item() == 0


def test_gspo_sequence_ratio_and_its_gradient():
    m = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    # log ratios log 2 and 0: s = exp(log(2) / 2) = sqrt(2) = 1.414 > 1.2 -> clipped: -1.2 on each token
    logp = torch.tensor([[math.log(2.0), 0.0, 3.0]], requires_grad=True)
    loss, st = gspo_surrogate(logp, old, torch.ones(1, 3), m, 0.2, 0.2)
    assert loss.tolist()[0] == pytest.approx([-1.2, -1.2, 0.0]) and st["clipfrac_high"].item() == 1.0
    # inside the range (log ratios 0.1, -0.1: s = 1): l = -A s on both tokens; per-sequence mean
    # -> d/dlogp_t of -s = -s / n = -0.5 on each valid token, 0 on padding
    logp = torch.tensor([[0.1, -0.1, 3.0]], requires_grad=True)
    loss, _ = gspo_surrogate(logp, old, torch.ones(1, 3), m, 0.2, 0.2)
    assert loss.tolist()[0] == pytest.approx([-1.0, -1.0, 0.0])
    total, count = aggregate(loss, m, "seq_mean_token_mean", 3)
    (total / count).backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.5, -0.5, 0.0])


def test_aggregations_and_their_split_invariance():
    losses = torch.tensor([[1.0, 1.0, 1.0], [3.0, 7.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    modes = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum")
    # per-sequence means 1 and 3 -> 2; tokens (3 + 3) / 4 = 1.5; Dr. GRPO 6 / (2 sequences * 3) = 1
    whole = {mode: [x.item() for x in aggregate(losses, m, mode, 3)] for mode in modes}
    assert whole == {"seq_mean_token_mean": [4.0, 2.0], "token_mean": [6.0, 4.0], "seq_mean_token_sum": [6.0, 6.0]}
    for mode, (total, count) in whole.items():   # two micro-batches (or ranks) of one row each: same loss
        parts = [aggregate(losses[i:i + 1], m[i:i + 1], mode, 3) for i in range(2)]
        assert sum(p[0].item() for p in parts) / sum(p[1].item() for p in parts) == pytest.approx(total / count)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        aggregate(losses, m, "mean", 3)


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    assert informative_groups(SCORES, GROUPS).tolist() == [True] * 4 + [False] * 4
