"""PPO math pinned to values derived by hand."""
import math
from types import SimpleNamespace

import pytest
import torch

from nemo_rlhf.algorithms.ppo import (AdaptiveKLController, FixedKLController, gae, kl_penalized_rewards,
                                      policy_loss, value_loss, whiten, whiten_from_sums)
from nemo_rlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS, estimate_advantages
from nemo_rlhf.algorithms.reductions import masked_sums
from nemo_rlhf.errors import ConfigError


def test_gae_three_steps_by_hand():
    # gamma = 0.9, lam = 0.5, V = [1, 2, 3], r = [0, 0, 1]
    # delta_2 = 1 + 0.9*0 - 3 = -2         A_2 = -2
    # delta_1 = 0 + 0.9*3 - 2 = 0.7        A_1 = 0.7 + 0.45*(-2) = -0.2
    # delta_0 = 0 + 0.9*2 - 1 = 0.8        A_0 = 0.8 + 0.45*(-0.2) = 0.71
    v = torch.tensor([[1.0, 2.0, 3.0]])
    r = torch.tensor([[0.0, 0.0, 1.0]])
    adv, ret = gae(v, r, torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.71, -0.2, -2.0])
    assert ret.tolist()[0] == pytest.approx([1.71, 1.8, 1.0])


def test_gae_ignores_padding_after_the_episode():
    v = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    r = torch.tensor([[0.0, 0.0, 1.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(v, r, m, gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.71, -0.2, -2.0, 0.0])
    assert ret[0, 3].item() == 0.0
    # gamma = lam = 1: A_t = sum of future rewards - V_t
    adv, _ = gae(v, r, m, gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.0, -1.0, -2.0, 0.0])


def test_the_gae_row_of_the_estimator_table_is_gae_by_hand():
    # the three-step example above, with padding after the episode: A = [0.71, -0.2, -2, 0]
    v = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    r = torch.tensor([[0.0, 0.0, 1.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    hp = SimpleNamespace(gamma=0.9, lam=0.5)
    assert tuple(ADVANTAGE_ESTIMATORS) == ("gae", "grpo", "rloo", "reinforce++") and ADVANTAGE_ESTIMATORS["gae"].needs_values
    adv, ret = estimate_advantages("gae", r, v, m, hp)
    assert adv.tolist()[0] == pytest.approx([0.71, -0.2, -2.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.71, 1.8, 1.0, 0.0])
    ref = gae(v, r, m, gamma=0.9, lam=0.5)
    assert torch.equal(adv, ref[0]) and torch.equal(ret, ref[1])
    with pytest.raises(ValueError, match="unknown ppo.advantage_estimator 'vtrace' \\(known: gae, grpo, rloo, reinforce\\+\\+\\)"):
        estimate_advantages("vtrace", r, None, m, hp)
    with pytest.raises(ValueError, match="gae needs a critic"):
        estimate_advantages("gae", r, None, m, hp)


def test_ppo_config_validates_estimator_and_critic_against_their_tables():
    from nemo_rlhf.modules.ppo import CRITICS
    from nemo_rlhf.recipes.ppo import PPOConfig

    assert tuple(CRITICS) == ("separate", "value_head", "none")
    assert [k for k, c in CRITICS.items() if c.on_actor] == ["value_head"]
    cfg = PPOConfig()
    assert (cfg.advantage_estimator, cfg.critic) == ("gae", "separate")
    with pytest.raises(ConfigError, match="ppo.advantage_estimator must be gae\\|grpo\\|rloo\\|reinforce\\+\\+, got 'vtrace'"):
        PPOConfig(advantage_estimator="vtrace")
    with pytest.raises(ConfigError, match="ppo.critic must be separate\\|value_head\\|none, got 'q'"):
        PPOConfig(critic="q")
    with pytest.raises(ConfigError, match="advantage_estimator=rloo is critic-free: set ppo.critic=none"):
        PPOConfig(advantage_estimator="rloo")
    with pytest.raises(ConfigError, match="advantage_estimator=gae needs a critic"):
        PPOConfig(critic="none")
    with pytest.raises(ConfigError, match="ppo.num_generations must be > 1"):
        PPOConfig(advantage_estimator="grpo", critic="none")
    with pytest.raises(ConfigError, match="ppo.loss_aggregation must be"):
        PPOConfig(loss_aggregation="sum")
    cfg = PPOConfig(advantage_estimator="grpo", critic="none", num_generations=8)
    assert cfg.num_rollouts % cfg.num_generations == 0


def test_policy_loss_clipping_cases():
    # ratio = e for every token; A = +1: clipped at 1.2 -> loss -1.2 ; A = -1: max(e, 1.2) = e
    old = torch.zeros(1, 3)
    logp = torch.ones(1, 3)
    m = torch.ones(1, 3)
    loss, st = policy_loss(logp, old, torch.ones(1, 3), m, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert st["policy_clipfrac"].item() == 1.0
    loss, st = policy_loss(logp, old, -torch.ones(1, 3), m, clip_range=0.2)
    assert loss.item() == pytest.approx(math.e)
    assert st["policy_clipfrac"].item() == 0.0
    # ratio 1: loss = -mean(A); approx_kl = 0
    loss, st = policy_loss(old, old, torch.tensor([[1.0, 2.0, 3.0]]), m, 0.2)
    assert loss.item() == pytest.approx(-2.0) and st["approx_kl"].item() == 0.0
    # padding ignored
    loss, _ = policy_loss(old, old, torch.tensor([[1.0, 2.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(-1.5)


def test_value_loss_clipping_by_hand():
    # old V = 0, R = 1, eps_v = 0.2
    # V = 0.5: clipped V = 0.2 -> max(0.25, 0.64) = 0.64 -> 0.5 * 0.64 = 0.32
    # V = 0.1: inside the clip -> 0.5 * 0.81 = 0.405
    loss, st = value_loss(torch.tensor([[0.5]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.32) and st["value_clipfrac"].item() == 1.0
    loss, st = value_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.405) and st["value_clipfrac"].item() == 0.0
    loss, _ = value_loss(torch.tensor([[0.1, 7.0]]), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(0.405)


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, 3.0]), logp, ref, m, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, -1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 2.05], [0.0, 3.1, 0.0]]))


def test_whiten_masks_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)   # unbiased std of 1,2,3 is 1
    assert w[0, 3].item() == 0.0


def test_whiten_1234_with_a_mask_by_hand():
    # valid 1, 2, 4: mean 7/3, deviations -4/3, -1/3, 5/3, unbiased var (16 + 1 + 25) / 9 / 2 = 7/3
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    sd = (7 / 3) ** 0.5
    assert whiten(x, m).tolist()[0] == pytest.approx([-4 / 3 / sd, -1 / 3 / sd, 0.0, 5 / 3 / sd], rel=1e-6)
    assert whiten(x, m, shift_mean=False).tolist()[0] == pytest.approx(
        [-4 / 3 / sd + 7 / 3, -1 / 3 / sd + 7 / 3, 0.0, 5 / 3 / sd + 7 / 3], rel=1e-6)
    # no mask: mean 2.5, unbiased var 5/3
    assert whiten(x, torch.ones_like(m)).tolist()[0] == pytest.approx(
        [v / (5 / 3) ** 0.5 for v in (-1.5, -0.5, 0.5, 1.5)], rel=1e-6)


def test_whiten_from_sums_of_shards_equals_whitening_the_whole_batch():
    # what dp_whiten does over data-parallel ranks: add the shards' (count, sum, sum of squares)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    m = (torch.rand(6, 5, generator=g) > 0.3).float()
    whole = whiten(x, m)
    sums = masked_sums(x[:2], m[:2]) + masked_sums(x[2:], m[2:])
    parts = torch.cat([whiten_from_sums(x[:2], m[:2], sums), whiten_from_sums(x[2:], m[2:], sums)])
    assert torch.allclose(parts, whole, atol=1e-6)
    assert not torch.allclose(whiten(x[:2], m[:2]), whole[:2], atol=1e-3)   # the shard alone differs


def test_kl_controllers_follow_ziegler():
    fixed = FixedKLController(0.1)
    fixed.update(10.0, 64)
    assert fixed.value == 0.1
    c = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=100)      # error clipped to +0.2: 0.2 * (1 + 0.2 * 0.01)
    assert c.value == pytest.approx(0.2 * 1.002)
    c = AdaptiveKLController(0.2, 6.0, 10000)
    c.update(current_kl=5.4, n_steps=1000)     # error -0.1: 0.2 * (1 - 0.1 * 0.1)
    assert c.value == pytest.approx(0.2 * 0.99)
