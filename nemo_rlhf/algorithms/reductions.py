"""Masked reductions. Losses are sums over valid tokens divided by a count the caller passes in
(the tokens of the whole global batch), so gradients do not depend on how the batch is split
over micro-batches, data-parallel or pipeline ranks."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum(values * mask) over ``dim`` (all dims when None). Padding (mask 0) contributes nothing,
    even where ``values`` is inf/nan there."""
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None,
                denominator: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """masked_sum / (``denominator`` if given, else the number of valid entries, at least 1)."""
    total = masked_sum(values, mask, dim)
    if denominator is None:
        denominator = mask.sum() if dim is None else mask.sum(dim)
        denominator = torch.clamp(denominator.to(total.dtype), min=1.0)
    return total / denominator


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        var = var * n / torch.clamp(n - 1, min=1)
    return var


# -- sufficient statistics ------------------------------------------------------------------------
# Moments that must hold over a whole data-parallel batch are computed from statistics that add up
# (counts, sums, sums of squares) or that combine exactly (Chan's formula), so a reduction over
# ranks (nemo_rlhf.parallel.reductions) gives the moments of the concatenated batch.


def masked_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[3] float64: (count, sum, sum of squares) of the valid entries (``mask`` in {0, 1}).

    The sums are taken in ``values``' dtype and then widened, so adding the sums of several
    ranks in float64 loses nothing more."""
    return torch.stack([mask.sum().to(values.dtype), masked_sum(values, mask),
                        masked_sum(values * values, mask)]).double()


def mean_var_from_sums(sums: torch.Tensor, unbiased: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (Bessel-corrected when ``unbiased``) from :func:`masked_sums`' [3]
    (count n, sum s, sum of squares q), in float64:

        mean = s / n,   var = (q / n - mean^2) * n / (n - 1)

    (n counts as at least 1, and n - 1 too.) The one-pass formula cancels when |mean| >> std;
    it serves whitening of O(1) advantages, where it is what PPO has always run."""
    n, s, q = sums.double().unbind()
    denominator = torch.clamp(n, min=1.0)
    mean = s / denominator
    var = q / denominator - mean ** 2
    if unbiased:
        var = var * n / torch.clamp(n - 1, min=1.0)
    return mean, var


class Moments(NamedTuple):
    """Count, mean and population variance (divided by the count) of a set of numbers."""

    count: float
    mean: float
    var: float


def moments(values: torch.Tensor) -> Moments:
    """:class:`Moments` of all entries of ``values`` (two-pass mean and variance)."""
    n = values.numel()
    if n == 0:
        return Moments(0.0, 0.0, 0.0)
    var = float(values.var(unbiased=False)) if n > 1 else 0.0
    return Moments(float(n), float(values.mean()), var)


def combine_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two sets from theirs (Chan, Golub & LeVeque 1979, the parallel
    update; trlX's ``RunningMoments.update``):

        n     = n_a + n_b,   delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        var   = (var_a * n_a + var_b * n_b + delta^2 * n_a * n_b / n) / n
    """
    total = a.count + b.count
    if total == 0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * b.count / total
    var = (a.var * a.count + b.var * b.count + delta ** 2 * a.count * b.count / total) / total
    return Moments(total, mean, var)


# Running moments start as trlX's: mean 0, variance 1, a vanishing count (the first batch takes over)
INITIAL_MOMENTS = Moments(count=1e-8, mean=0.0, var=1.0)


def update_moments(state: Moments, batch: Moments) -> Moments:
    """Running moments after one more batch: :func:`combine_moments` of the state and the batch's
    moments (e.g. ``moments(x)``, or the data-parallel ``nemo_rlhf.parallel.reductions.dp_moments``)."""
    return combine_moments(state, batch)


def moments_std(state: Moments, eps: float = 1e-8) -> float:
    """sqrt(max(var, eps)), the population standard deviation, never 0."""
    return max(state.var, eps) ** 0.5
