"""Masked reductions. Losses are sums over valid tokens divided by a count the caller passes in
(the tokens of the whole global batch), so gradients do not depend on how the batch is split
over micro-batches, data-parallel or pipeline ranks."""
from __future__ import annotations

from typing import Optional

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
