"""Rejection fine-tuning (RFT; as trlX's RFT trainer, after Dong et al. 2023 "RAFT" and Gulcehre
et al. 2023 "ReST"): sample several completions per prompt, keep those whose reward reaches a
threshold that rises over the iterations, fine-tune on them with the SFT loss, repeat.

The threshold of a prompt at iteration ``i`` is the ``percentile(i)`` quantile of the rewards of
its samples (as trlX: per prompt, so an easy prompt cannot crowd out a hard one), the percentile rising linearly from ``start`` to ``end`` over
``improve_steps`` iterations and staying at ``end`` after; ``min_reward`` is an absolute floor
(with a 0/1 reward, the 70th percentile of mostly-zero scores is 0, which alone would keep the
failures too).
"""
from __future__ import annotations

from typing import Optional

import torch


def rising_percentile(iteration: int, start: float, end: float, improve_steps: int) -> float:
    """start + (end - start) * min(iteration / (improve_steps - 1), 1); ``iteration`` counts from 0."""
    if improve_steps <= 1:
        return end
    return start + (end - start) * min(iteration / (improve_steps - 1), 1.0)


def rejection_thresholds(scores: torch.Tensor, groups: torch.Tensor, percentile: float,
                         min_reward: Optional[float] = None) -> torch.Tensor:
    """Per sample [B]: the ``percentile`` (in [0, 1]) quantile of the scores of its group (the
    samples of one prompt; linear interpolation, numpy's default), raised to ``min_reward`` where
    that is higher."""
    out = torch.empty_like(scores, dtype=torch.float64)
    for g in torch.unique(groups):
        rows = groups == g
        out[rows] = torch.quantile(scores[rows].double(), percentile)
    return out if min_reward is None else out.clamp(min=float(min_reward))


def accepted(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Bool mask [B]: the samples whose score reaches their threshold."""
    return scores.double() >= thresholds
