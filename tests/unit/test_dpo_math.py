"""Preference losses pinned to values derived by hand from the papers' formulas."""
import math
from types import SimpleNamespace

import pytest
import torch

from nemo_rlhf.algorithms.dpo import (DPO_LOSS_TYPES, DPO_LOSSES, KTO_LOSSES, PREFERENCE_LOSSES, KTOLogps,
                                      PreferenceLogps, bradley_terry_loss, dpo_loss, kto_kl_estimate, kto_kl_sums,
                                      kto_loss, kto_reference_point, kto_variant_loss, orpo_loss, preference_loss,
                                      simpo_loss)
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.modules.dpo import length_normalized, needs_reference

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


# -- the DPO family as one table --------------------------------------------------------------------
HP = SimpleNamespace(beta=0.5, label_smoothing=0.0, simpo_gamma=0.5, orpo_lambda=0.1, cpo_alpha=2.0,
                     length_normalize=False)


def test_the_family_table_rows():
    assert DPO_LOSS_TYPES == ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "cpo")
    assert [t for t in DPO_LOSS_TYPES if not DPO_LOSSES[t].needs_reference] == ["simpo", "orpo", "cpo"]
    assert [t for t in DPO_LOSS_TYPES if DPO_LOSSES[t].length_normalized] == ["simpo", "orpo"]
    # KTO's row: always a reference
    assert needs_reference(SimpleNamespace(loss_type="kto")) and not needs_reference(SimpleNamespace(loss_type="orpo"))
    assert needs_reference(SimpleNamespace(loss_type="ipo"))
    assert length_normalized(SimpleNamespace(loss_type="simpo", length_normalize=False))
    assert length_normalized(SimpleNamespace(loss_type="ipo", length_normalize=True))
    assert not length_normalized(SimpleNamespace(loss_type="sigmoid", length_normalize=False))
    assert not length_normalized(SimpleNamespace(loss_type="kto"))              # KTO: sums
    with pytest.raises(ValueError, match="unknown dpo.loss_type 'rpo'"):
        preference_loss("rpo", PreferenceLogps(T([0.0]), T([0.0]), None, None, T([0.0])), HP)


def test_cpo_by_hand():
    # summed log-probs -4 vs -6, beta 0.5 -> logits 1 ; chosen NLL 0.25, alpha 2 -> -log sigma(1) + 0.5
    x = PreferenceLogps(T([-4.0]), T([-6.0]), None, None, chosen_nll=T([0.25]))
    losses, rc, rr = preference_loss("cpo", x, HP)
    assert losses.item() == pytest.approx(-ls(1.0) + 0.5)
    assert (rc.item(), rr.item()) == (-2.0, -3.0)
    assert not DPO_LOSSES["cpo"].needs_reference and not DPO_LOSSES["cpo"].length_normalized


def test_each_row_by_hand():
    # reference rows: h = (-1 - -3) - (-2 - -2) = 2, beta 0.5 -> beta h = 1 ; rewards beta (logp - ref)
    x = PreferenceLogps(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), chosen_nll=T([0.25]))
    losses, rc, rr = preference_loss("sigmoid", x, HP)
    assert losses.item() == pytest.approx(-ls(1.0)) and rc.item() == 0.5 and rr.item() == -0.5
    assert preference_loss("ipo", x, HP)[0].item() == pytest.approx((2 - 1) ** 2)       # (h - 1 / (2 beta))^2
    assert preference_loss("hinge", x, HP)[0].item() == 0.0                             # max(0, 1 - 1)
    assert preference_loss("robust", x, HP)[0].item() == pytest.approx(-ls(1.0))        # eps 0: sigmoid
    # reference-free rows on average log-probs -1 vs -1.5: SimPO logits 0.5 * 0.5 - 0.5 = -0.25
    x = PreferenceLogps(T([-1.0]), T([-1.5]), None, None, chosen_nll=T([1.0]))
    losses, rc, rr = preference_loss("simpo", x, HP)
    assert losses.item() == pytest.approx(-ls(-0.25)) and rc.item() == -0.5 and rr.item() == -0.75
    # ORPO: log odds = log(p_w / (1 - p_w)) - log(p_l / (1 - p_l)), p = e^avg ; loss NLL_w - lambda log sigma
    lo = math.log(math.exp(-1) / (1 - math.exp(-1))) - math.log(math.exp(-1.5) / (1 - math.exp(-1.5)))
    losses, rc, _ = preference_loss("orpo", x, HP)
    assert losses.item() == pytest.approx(1.0 - 0.1 * ls(lo)) and rc.item() == -0.5


def test_the_kto_table_rows_by_hand():
    # one name names one row of one family: a block's loss_type says which table it is from
    assert tuple(KTO_LOSSES) == ("kto",) and not set(KTO_LOSSES) & set(DPO_LOSSES)
    assert len(PREFERENCE_LOSSES) == len(DPO_LOSSES) + len(KTO_LOSSES)
    # the kto row is kto_loss: r = [1, -1], z0 = 0.5, beta 2, w_u 2
    # desirable: 1 - sigma(2 * (1 - 0.5)) ; undesirable: 2 * (1 - sigma(2 * (0.5 + 1)))
    sig = lambda x: 1 / (1 + math.exp(-x))
    hp = SimpleNamespace(beta=2.0, desirable_weight=1.0, undesirable_weight=2.0)
    x = KTOLogps(T([-1.0, -3.0]), T([-2.0, -2.0]), T([True, False]), T(0.5))
    assert kto_variant_loss("kto", x, hp).tolist() == pytest.approx([1 - sig(1.0), 2 * (1 - sig(3.0))])
    with pytest.raises(ValueError, match="unknown kto.loss_type 'sigmoid'"):
        kto_variant_loss("sigmoid", x, hp)


def test_kto_loss_type_is_validated_against_the_table():
    from nemo_rlhf.recipes.kto import KTOConfig

    assert KTOConfig().loss_type == "kto"
    with pytest.raises(ConfigError, match=r"kto.loss_type must be kto, got 'apo'"):
        KTOConfig(loss_type="apo")


def test_kto_reference_point_of_sums():
    # log-ratios 1, 2 in one micro-batch and -2 in another: global mean 1/3 ; per micro-batch 1.5 and 0
    s1, n1 = kto_kl_sums(T([-1.0, -1.0]), T([-2.0, -3.0]))
    s2, n2 = kto_kl_sums(T([-3.0]), T([-1.0]))
    assert (s1.item(), n1.item(), s2.item(), n2.item()) == (3.0, 2.0, -2.0, 1.0)
    assert kto_reference_point((s1 + s2) / (n1 + n2)).item() == pytest.approx(1 / 3)
    assert kto_reference_point(T(-0.5)).item() == 0.0
    assert kto_kl_estimate(T([-1.0, -1.0]), T([-2.0, -3.0])).item() == 1.5


# -- KTO's z0 over the global batch: loss and grads do not depend on the micro-batch size -------------
def _kto_engine_and_batch():
    from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from nemo_rlhf.data.preference import KTODataset, randomwalk_pairs, unpair
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.modules.dpo import sequence_logps
    from nemo_rlhf.modules.engine import MegatronEngine
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    task = RandomWalks(seed=1000)
    tok = CharTokenizer(task.vocab)
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16)
    torch.manual_seed(0)
    engine = MegatronEngine(model, ParallelConfig(), OptimConfig(name="sgd", lr=0.1, clip_grad=0.0),
                            tok.vocab_size, max_steps=10)
    ds = KTODataset.build_unpaired(unpair(randomwalk_pairs(task, tok, 4, seed=0)), model.seq_length, tok.pad_id,
                                   tok.eos_id, seed=0)
    with torch.no_grad():
        logps = sequence_logps(engine.module.eval(), ds.tokens, ds.labels, ds.loss_mask)
    # reference log-probs near the policy's: log-ratios of order 1 (the KL ones mostly positive, so
    # that z0 > 0 and each micro-batch alone would give another z0)
    g = torch.Generator().manual_seed(5)
    ref = logps - torch.stack([0.5 * torch.randn(len(ds), generator=g), 0.3 + torch.randn(len(ds), generator=g)], 1)
    batch = {"tokens": ds.tokens, "labels": ds.labels, "loss_mask": ds.loss_mask, "ref_logps": ref,
             "desirable": ds.desirable}
    return engine, batch, logps


def test_kto_loss_and_grads_equal_at_micro_batch_1_and_4(mp):
    from types import SimpleNamespace as NS

    from nemo_rlhf.modules.dpo import kto_forward_backward

    engine, batch, logps = _kto_engine_and_batch()
    cfg = NS(loss_type="kto", beta=1.0, desirable_weight=1.0, undesirable_weight=1.5)
    runs = {}
    for mbs in (1, 4, 8):
        stats = kto_forward_backward(engine, batch, mbs, cfg)
        runs[mbs] = stats, [p.main_grad.detach().clone() for p in engine.module.parameters()]
    log_ratio = logps[:, 1] - batch["ref_logps"][:, 1]
    z0 = float(log_ratio.mean())
    assert z0 > 0.1 and runs[8][0]["kl"] == pytest.approx(z0, rel=1e-5)
    # per micro-batch of 1 (the old estimate) z0 would have been each example's clamped log-ratio
    assert float((log_ratio.clamp(min=0) - z0).abs().max()) > 0.1
    base, base_grads = runs[8]
    assert 0 < base["loss"] < 1.5 and any(float(g.abs().max()) > 1e-4 for g in base_grads)
    for mbs in (1, 4):
        stats, grads = runs[mbs]
        for k in base:
            assert stats[k] == pytest.approx(base[k], rel=1e-5, abs=1e-6), (mbs, k)
        assert max(float((g - b).abs().max()) for g, b in zip(grads, base_grads)) < 1e-6, mbs
