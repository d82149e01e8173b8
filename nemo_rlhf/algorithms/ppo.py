"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences"; trlX's ``modeling_ppo.py``).

All tensors are ``[B, T]`` over response tokens: position t is the t-th generated token, ``mask``
is 1 for real tokens (through EOS) and 0 for padding. Means are masked means; where trlX averages
over padding too (advantage whitening), we mask it. GAE and the other advantage estimators are a
table in :mod:`nemo_rlhf.algorithms.advantages` (``gae`` stays importable from here).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from nemo_rlhf.algorithms.advantages import gae  # noqa: F401  (GAE lives in the advantage-estimator table)
from nemo_rlhf.algorithms.policy_losses import clipped_surrogate, kl_k3
from nemo_rlhf.algorithms.reductions import masked_mean, masked_sums, mean_var_from_sums

Stats = Dict[str, torch.Tensor]


def whiten_from_sums(values: torch.Tensor, mask: torch.Tensor, sums: torch.Tensor, shift_mean: bool = True,
                     eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) with the mean and the unbiased variance from ``sums``, the
    :func:`~nemo_rlhf.algorithms.reductions.masked_sums` (count, sum, sum of squares) of the valid
    entries, of this batch or of the whole data-parallel batch (reduced by the caller); the mean
    is added back when ``shift_mean`` is False; padding stays 0. trlX whitens over padding too; we
    mask it."""
    mean, var = mean_var_from_sums(sums)
    mean = mean.to(values.dtype)
    out = (values - mean) * torch.rsqrt((torch.clamp(var, min=0.0) + eps).to(values.dtype))
    if not shift_mean:
        out = out + mean
    return out * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """:func:`whiten_from_sums` over this batch alone."""
    return whiten_from_sums(values, mask, masked_sums(values, mask), shift_mean, eps)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> Tuple[torch.Tensor, Stats]:
    """Clipped surrogate objective (Schulman et al. 2017, Eq. 7), negated to a loss:

        ratio = exp(logp - logp_old)
        L     = masked_mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

    :func:`~nemo_rlhf.algorithms.policy_losses.clipped_surrogate` with one clip range, averaged
    over the valid tokens."""
    token_losses, st = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range, clip_range)
    loss = masked_mean(token_losses, mask)
    with torch.no_grad():
        approx_kl = masked_mean(kl_k3((old_logprobs - logprobs) * mask), mask)   # KL(old || new)
    return loss, {"policy_loss": loss.detach(), "approx_kl": approx_kl,
                  "policy_clipfrac": st["clipfrac_low"] + st["clipfrac_high"], "ratio_mean": st["ratio_mean"]}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> Tuple[torch.Tensor, Stats]:
    """Clipped value loss as in trlX / OpenAI baselines, with the 0.5 factor:

        V_clip = old_V + clip(V - old_V, -eps_v, eps_v)
        L      = 0.5 * masked_mean( max((V - R)^2, (V_clip - R)^2) )
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": clipfrac,
                  "values_mean": masked_mean(values.detach(), mask)}


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (Ziegler et al. 2019, Eq. 2): r_t = -beta * (logp_t - logp_ref_t), plus the
    sequence score on the last valid token. ``scores`` [B]. Returns (rewards [B, T], kl [B, T])."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()   # one-hot last valid token
    rewards = rewards + last.float() * scores[:, None]
    return rewards * mask, kl


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, Sec. 2.2):

        e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def make_kl_controller(init_kl_coef: float, target: Optional[float], horizon: int):
    return FixedKLController(init_kl_coef) if target is None else AdaptiveKLController(init_kl_coef, target, horizon)
