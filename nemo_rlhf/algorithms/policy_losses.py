"""Policy losses of the online-RL family and their knobs, as users compare them (PPO, GRPO, DAPO,
Dr. GRPO, GSPO), as pure functions on ``[B, T]`` response tokens (``mask`` 1 for real tokens).

    ratio        token-level pi / pi_old (PPO, GRPO, DAPO) or GSPO's sequence-level ratio
    clipping     separate lower / upper ranges (DAPO's clip-higher: eps_high > eps_low)
    KL term      optional KL(pi || pi_ref) in the loss, per token by the k1 / k2 / k3 estimator
    aggregation  how token losses become one number, chosen so that the loss of a global batch
                 does not depend on how it is split into micro-batches and data-parallel ranks

Each aggregation returns a micro-batch's (sum, count); the global loss is the total sum over the
total count, so it does not depend on the micro-batch size or the data-parallel split.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from nemo_rlhf.algorithms.reductions import masked_mean


def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = log(pi / pi_ref): unbiased for KL(pi || pi_ref) under samples of pi, high variance, can be < 0."""
    return log_ratio


def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * log(pi / pi_ref)^2: biased, low variance, >= 0."""
    return 0.5 * log_ratio ** 2


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = pi_ref / pi - 1 - log(pi_ref / pi) (Schulman, "Approximating KL divergence"): unbiased,
    >= 0, GRPO's estimator (DeepSeekMath Eq. 4)."""
    return torch.exp(-log_ratio) - 1 + log_ratio


KL_ESTIMATORS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""The ppo.kl_estimator values: log(pi / pi_ref) per token -> the KL estimate per token."""


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, eps_low: float, eps_high: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token clipped surrogate, negated (PPO Eq. 7 with DAPO's decoupled ranges):

        r_t = exp(logp_t - logp_old_t)
        l_t = max(-A_t * r_t, -A_t * clip(r_t, 1 - eps_low, 1 + eps_high))

    Returns (l [B, T] (0 on padding), stats): ``clipfrac_low`` / ``clipfrac_high`` are the shares of
    valid tokens whose loss the lower (A < 0, r < 1 - eps_low) or upper (A > 0, r > 1 + eps_high)
    bound clipped."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    return _clip(ratio, advantages, mask, eps_low, eps_high)


def gspo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, eps_low: float, eps_high: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, the length-normalised sequence
    likelihood ratio s_i = exp(mean_t (logp_t - logp_old_t)), clipped per sequence:

        l_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - eps_low, 1 + eps_high))

    placed on each valid token of sequence i (so a per-sequence mean aggregation gives the paper's
    objective). ``advantages`` [B, T] hold the sequence advantage on every valid token."""
    n = mask.sum(-1).clamp(min=1)
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(-1) / n
    seq_adv = (advantages * mask).sum(-1) / n
    ratio = torch.exp(seq_log_ratio)[:, None].expand_as(mask)
    return _clip(ratio, seq_adv[:, None].expand_as(mask), mask, eps_low, eps_high)


def _clip(ratio, advantages, mask, eps_low, eps_high):
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.max(unclipped, clipped) * mask
    with torch.no_grad():
        hit = (clipped > unclipped) & mask.bool()
        stats = {"clipfrac_low": masked_mean((hit & (ratio < 1)).float(), mask),
                 "clipfrac_high": masked_mean((hit & (ratio > 1)).float(), mask),
                 "ratio_mean": masked_mean(ratio.detach(), mask)}
    return loss, stats


POLICY_LOSSES = {"token": clipped_surrogate, "gspo": gspo_surrogate}
"""The ppo.policy_loss values: the importance ratio per token (PPO, GRPO, DAPO) or per sequence (GSPO)."""


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, mode: str, max_length: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of this micro-batch such that the loss of the global batch is the sum of the
    sums over the sum of the counts, over all micro-batches and ranks -- the same number however
    the batch is split (megatron's per-token loss normalisation does exactly this division):

        seq_mean_token_mean   mean over sequences of each sequence's token mean (GRPO, GSPO):
                              sum_i mean_t l_it  /  sequences
        token_mean            mean over all valid tokens (PPO, DAPO):  sum l  /  tokens
        seq_mean_token_sum    Dr. GRPO's constant normaliser, no length bias:
                              sum l  /  (sequences * max_length)
    """
    losses = token_losses * mask
    sequences = torch.tensor(float(mask.shape[0]), dtype=losses.dtype, device=losses.device)
    if mode == "seq_mean_token_mean":
        return (losses.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), sequences
    if mode == "token_mean":
        return losses.sum(), mask.sum().to(losses.dtype)
    if mode == "seq_mean_token_sum":
        return losses.sum(), sequences * max_length
    raise ValueError(f"unknown loss aggregation {mode!r} (known: {', '.join(LOSS_AGGREGATIONS)})")


LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum")
"""The ppo.loss_aggregation values."""


def informative_groups(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic sampling filter: [B] bool, True for the samples of groups whose scores are
    not all equal (a group with one reward value has zero advantage and no gradient)."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    hi = torch.full((len(ids),), -torch.inf, dtype=scores.dtype).scatter_reduce(0, inverse, scores, "amax")
    lo = torch.full((len(ids),), torch.inf, dtype=scores.dtype).scatter_reduce(0, inverse, scores, "amin")
    return (hi > lo)[inverse]
