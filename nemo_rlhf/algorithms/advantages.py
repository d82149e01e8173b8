"""Advantage estimators for policy-gradient RL on language models, one flat table
(:data:`ADVANTAGE_ESTIMATORS`: ppo.advantage_estimator -> row), as verl registers its estimators
by name.

Every row has the same signature::

    estimate(rewards [B, T], values [B, T] | None, mask [B, T], hp) -> (advantages [B, T], returns [B, T])

over response tokens: ``rewards`` are per-token (the KL penalty on every token plus the sequence
score on the last valid one, :func:`~nemo_rlhf.algorithms.ppo.kl_penalized_rewards`), ``mask`` is 1
for real tokens (through EOS) and 0 for padding, which gets 0 advantage. ``hp`` is the ppo config
block (gamma, lam, ...): each row reads the fields it needs. ``values`` are the critic's V(s_t);
critic-free estimators (GRPO, RLOO, REINFORCE++: the next issue's rows) are called with
``values=None`` and must not read them; their row says ``needs_values=False``. Whitening is not
part of an estimator: the caller whitens the advantages over the data-parallel batch
(ppo.whiten_advantages).
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
         hp) -> Tuple[torch.Tensor, torch.Tensor]:
    return gae(values, rewards, mask, hp.gamma, hp.lam)


@dataclass(frozen=True)
class AdvantageEstimator:
    """One row of the advantage-estimator table."""

    estimate: Estimate
    """(rewards [B, T], values [B, T] or None, mask [B, T], hp) -> (advantages, returns), each [B, T]."""
    needs_values: bool
    """True: reads the critic's values (a critic must be trained); False: critic-free, values=None."""


ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {
    #          estimate   needs values
    "gae": AdvantageEstimator(_gae, True),
    # "grpo", "rloo", "reinforce++": critic-free rows (needs_values=False) -- the next issue
}
"""The ppo.advantage_estimator values."""


def estimate_advantages(name: str, rewards: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor,
                        hp) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``name`` row of :data:`ADVANTAGE_ESTIMATORS` on one batch."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown ppo.advantage_estimator {name!r} (known: {', '.join(ADVANTAGE_ESTIMATORS)})")
    row = ADVANTAGE_ESTIMATORS[name]
    if row.needs_values and values is None:
        raise ValueError(f"ppo.advantage_estimator={name} needs a critic's values")
    return row.estimate(rewards, values, mask, hp)
