"""Advantage estimators for policy-gradient RL on language models, one flat table
(:data:`ADVANTAGE_ESTIMATORS`: ppo.advantage_estimator -> row), as verl registers its estimators
by name.

Every row has the same signature::

    estimate(rewards [B, T], values [B, T] | None, mask [B, T], hp, groups [B] | None)
        -> (advantages [B, T], returns [B, T])

over response tokens: ``rewards`` are per-token (the KL penalty on every token plus the sequence
score on the last valid one, :func:`~nemo_rlhf.algorithms.ppo.kl_penalized_rewards`), ``mask`` is 1
for real tokens (through EOS) and 0 for padding, which gets 0 advantage. ``hp`` is the ppo config
block (gamma, lam, ...): each row reads the fields it needs. ``values`` are the critic's V(s_t);
critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) are called with ``values=None`` and
do not read them; their row says ``needs_values=False``. ``groups`` [B] (long) names each row's
prompt: the ``num_generations`` samples of one prompt share a group id, and a group is whole in the
batch an estimator sees (the rollout keeps a prompt's samples on one data-parallel rank). Rows with
``needs_groups`` read it. Whitening over the data-parallel batch is not part of an estimator: the
caller does it where the row says ``whiten`` (REINFORCE++'s batch normalisation, GRPO's
batch-std variant), or where ppo.whiten_advantages asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

Estimate = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Any], Tuple[torch.Tensor, torch.Tensor]]


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), without whitening.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)          (V = 0 after the last valid token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V

    ``values``, ``rewards``, ``mask``: [B, T]; padding positions get 0 advantage. Returns
    ``(advantages, returns)``."""
    values, rewards = values * mask, rewards * mask
    b, t = values.shape
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros(b, dtype=values.dtype, device=values.device)
    next_value = torch.zeros_like(next_adv)
    for i in reversed(range(t)):
        m = mask[:, i]
        # delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        # A_t = delta_t + gamma * lam * A_{t+1}
        adv = delta + gamma * lam * next_adv
        advantages[:, i] = adv * m
        # a padded step passes nothing back: the episode ended before it
        next_adv = torch.where(m.bool(), adv, torch.zeros_like(adv))
        next_value = torch.where(m.bool(), values[:, i], torch.zeros_like(adv))
    return advantages, advantages + values


def _gae(rewards: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor,
         hp, groups=None) -> Tuple[torch.Tensor, torch.Tensor]:
    return gae(values, rewards, mask, hp.gamma, hp.lam)


def sequence_scores(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: the total reward of each sequence (its score plus any per-token KL penalty)."""
    return (rewards * mask).sum(-1)


def group_moments(scores: torch.Tensor, groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, over the rows of its group: (mean, unbiased std (0 for a group of one), size), each [B]."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    n = torch.zeros(len(ids), dtype=scores.dtype, device=scores.device).index_add_(0, inverse, torch.ones_like(scores))
    total = torch.zeros_like(n).index_add_(0, inverse, scores)
    mean = total / n
    sq = torch.zeros_like(n).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = torch.sqrt(sq / torch.clamp(n - 1, min=1))
    return mean[inverse], std[inverse], n[inverse]


def grpo_advantages(scores: torch.Tensor, groups: torch.Tensor, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3 outcome supervision): A_i = (r_i - mean_g) / (std_g + eps)
    over the G samples of one prompt; ``scale_by_std=False`` is Dr. GRPO's (Liu et al. 2025) unscaled
    A_i = r_i - mean_g. A group whose rewards are all equal gets A = 0 (no NaN). [B] -> [B]."""
    mean, std, _ = group_moments(scores, groups)
    centred = scores - mean
    return centred / (std + eps) if scale_by_std else centred


def rloo_advantages(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): the baseline of sample i is the mean reward of the other G - 1
    samples of its prompt, A_i = r_i - (sum_g - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g).
    A group of one has no baseline: A = 0. [B] -> [B]."""
    mean, _, n = group_moments(scores, groups)
    return torch.where(n > 1, (scores - mean) * n / torch.clamp(n - 1, min=1), torch.zeros_like(scores))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over the valid tokens of each row; padding gets 0. [B, T]."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(rewards.shape[1])):
        running = rewards[:, i] + gamma * running
        out[:, i] = running
    return out * mask


def _per_token(sequence_advantages: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    adv = sequence_advantages[:, None].to(mask.dtype) * mask
    return adv, adv


def _grpo(rewards, values, mask, hp, groups):
    return _per_token(grpo_advantages(sequence_scores(rewards, mask), groups, hp.grpo_scale == "group"), mask)


def _rloo(rewards, values, mask, hp, groups):
    return _per_token(rloo_advantages(sequence_scores(rewards, mask), groups), mask)


def _reinforce_pp(rewards, values, mask, hp, groups):
    """REINFORCE++ (Hu 2025): the token-level rewards (KL penalty folded in) summed to returns; the
    caller normalises them over the global batch (the row's ``whiten``)."""
    returns = discounted_returns(rewards, mask, hp.gamma)
    return returns, returns


@dataclass(frozen=True)
class AdvantageEstimator:
    """One row of the advantage-estimator table."""

    estimate: Estimate
    """(rewards [B, T], values [B, T] or None, mask [B, T], hp) -> (advantages, returns), each [B, T]."""
    needs_values: bool
    """True: reads the critic's values (a critic must be trained); False: critic-free, values=None."""
    needs_groups: bool = False
    """True: reads ``groups`` (several samples per prompt: ppo.num_generations > 1)."""
    whiten: Optional[bool] = None
    """True: the caller whitens the advantages over the data-parallel batch (part of the method);
    None: as ppo.whiten_advantages says."""


ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {
    #                                 estimate       needs values  needs groups  whiten
    "gae":         AdvantageEstimator(_gae,          True),
    "grpo":        AdvantageEstimator(_grpo,         False,        True),     # ppo.grpo_scale: group | batch | none
    "rloo":        AdvantageEstimator(_rloo,         False,        True),
    "reinforce++": AdvantageEstimator(_reinforce_pp, False,        False,        True),
}
"""The ppo.advantage_estimator values."""


def estimate_advantages(name: str, rewards: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor,
                        hp, groups: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``name`` row of :data:`ADVANTAGE_ESTIMATORS` on one batch."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown ppo.advantage_estimator {name!r} (known: {', '.join(ADVANTAGE_ESTIMATORS)})")
    row = ADVANTAGE_ESTIMATORS[name]
    if row.needs_values and values is None:
        raise ValueError(f"ppo.advantage_estimator={name} needs a critic's values")
    if row.needs_groups and groups is None:
        raise ValueError(f"ppo.advantage_estimator={name} needs the prompt group of each sample")
    return row.estimate(rewards, values, mask, hp, groups)
