"""ILQL loss terms pinned to hand-derived values."""
import math

import pytest
import torch

from nemo_rlhf.algorithms.ilql import ilql_logits, ilql_loss, polyak_update


def _case():
    # one sequence, 2 action positions + 1 padding, vocabulary of 2
    q1 = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    q2 = torch.tensor([[[0.5, 0.0], [0.0, 3.0], [9.0, 9.0]]])
    actions = torch.tensor([[0, 1, 0]])
    v = torch.tensor([[0.2, 1.0, 5.0]])
    v_next = torch.tensor([[1.0, 7.0, 0.0]])          # V(s_1) = 1; V(s_2) is terminal anyway
    nonterminal = torch.tensor([[1.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    nll = torch.tensor([[0.5, 1.5, 100.0]])
    return q1, q2, actions, v, v_next, nonterminal, rewards, mask, nll


def test_each_term_by_hand():
    q1, q2, actions, v, v_next, nonterminal, rewards, mask, nll = _case()
    kw = dict(gamma=0.5, tau=0.7)
    only = lambda **scales: ilql_loss(q1, q2, q1, q2, v, v_next, nll, actions, rewards, mask, nonterminal,
                                      **kw, **scales)
    # Q targets: t0: 0 + 0.5 * 1 = 0.5 ; t1 (next terminal): 1
    # Q1 taken = [1, 2] -> ((0.5)^2 + 1^2) / 2 = 0.625 ; Q2 taken = [0.5, 3] -> (0 + 4) / 2 = 2
    loss, st = only(alpha=0.0, cql_scale=0.0, awac_scale=0.0)
    assert loss.item() == pytest.approx(2.625) and st["loss_q"].item() == pytest.approx(2.625)
    # V: min target Q = [0.5, 2]; diff = [0.3, 1.0] both >= 0 -> tau * diff^2 -> 0.7 * (0.09 + 1) / 2
    assert st["loss_v"].item() == pytest.approx(0.7 * 1.09 / 2)
    # CQL: CE(q1[t0], 0) = log(1 + e^-1); CE(q1[t1], 1) = log(1 + e^-2)
    #      CE(q2[t0], 0) = log(1 + e^-0.5); CE(q2[t1], 1) = log(1 + e^-3)
    ce = lambda x: math.log(1 + math.exp(-x))
    expected_cql = (ce(1) + ce(2)) / 2 + (ce(0.5) + ce(3)) / 2
    assert st["loss_cql"].item() == pytest.approx(expected_cql, rel=1e-6)
    # AWAC with awac_beta 0: mean nll over valid actions = (0.5 + 1.5) / 2 = 1
    assert st["loss_awac"].item() == pytest.approx(1.0)
    loss, _ = only(alpha=2.0, cql_scale=0.1, awac_scale=3.0)
    assert loss.item() == pytest.approx(2.625 + 2 * 0.7 * 1.09 / 2 + 0.1 * expected_cql + 3.0, rel=1e-6)


def test_expectile_weights_below_and_above():
    q1, q2, actions, v, v_next, nonterminal, rewards, mask, nll = _case()
    v = torch.tensor([[1.5, 1.0, 0.0]])    # diff = [0.5 - 1.5, 2 - 1] = [-1, 1]
    _, st = ilql_loss(q1, q2, q1, q2, v, v_next, nll, actions, rewards, mask, nonterminal, gamma=0.5, tau=0.9)
    assert st["loss_v"].item() == pytest.approx((0.1 * 1 + 0.9 * 1) / 2)


def test_awac_weight_and_single_q():
    q1, q2, actions, v, v_next, nonterminal, rewards, mask, nll = _case()
    _, st = ilql_loss(q1, None, q1, None, v, v_next, nll, actions, rewards, mask, nonterminal, gamma=0.5,
                      awac_beta=1.0)
    # single head: target Q = q1 taken = [1, 2]; diff = [0.8, 1.0]; weights e^0.8, e^1
    assert st["loss_awac"].item() == pytest.approx((math.exp(0.8) * 0.5 + math.exp(1.0) * 1.5) / 2, rel=1e-6)
    assert st["loss_q"].item() == pytest.approx(0.625)


def test_sampling_logits_and_polyak():
    logits = torch.tensor([[0.0, 0.0]])
    out = ilql_logits(logits, torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0]]), torch.tensor([1.0]), beta=2.0)
    # log(0.5) + 2 * ([1, 2] - 1)
    assert out.tolist()[0] == pytest.approx([math.log(0.5), math.log(0.5) + 2.0])
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = b.weight.detach().clone()
    polyak_update(b, a, 0.25)
    assert torch.allclose(b.weight, 0.75 * before + 0.25 * a.weight)
