"""Reductions over megatron's data-parallel group of the sufficient statistics that
:mod:`nemo_rlhf.algorithms.reductions` defines, so that a statistic of the DP-sharded batch
equals the statistic of the whole (concatenated) batch on one rank.

Every function takes the process ``group`` to reduce over; ``None`` means a single rank (no
collective at all). :func:`data_parallel_group` gives megatron's DP group, or None at DP=1.
Collective: every rank of the group must call the same functions in the same order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from nemo_rlhf.algorithms.ppo import whiten_from_sums
from nemo_rlhf.algorithms.reductions import Moments, combine_moments, masked_sums, moments


def data_parallel_group() -> Optional[dist.ProcessGroup]:
    """megatron's data-parallel group, or None when it has one rank (nothing to reduce)."""
    from megatron.core import parallel_state as ps   # megatron loads lazily in parallel/ (5 s import)

    return ps.get_data_parallel_group() if ps.get_data_parallel_world_size() > 1 else None


def all_reduce_sum(values: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum of ``values`` over the ranks of ``group``, in float64 (a new tensor)."""
    total = values.detach().to(torch.float64).clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


def dp_masked_sums(values: torch.Tensor, mask: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """:func:`~nemo_rlhf.algorithms.reductions.masked_sums` (count, sum, sum of squares) of the
    valid entries on all ranks of ``group``."""
    return all_reduce_sum(masked_sums(values, mask), group)


def dp_whiten(values: torch.Tensor, mask: torch.Tensor, group: Optional[dist.ProcessGroup],
              shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whitening (:func:`~nemo_rlhf.algorithms.ppo.whiten_from_sums`) of this rank's ``values``
    with the mean and variance of the valid entries of all ranks."""
    return whiten_from_sums(values, mask, dp_masked_sums(values, mask, group), shift_mean, eps)


def dp_moments(values: torch.Tensor, group: Optional[dist.ProcessGroup]) -> Moments:
    """:class:`~nemo_rlhf.algorithms.reductions.Moments` of the entries of all ranks: each rank's
    (count, mean, variance), gathered and combined in rank order with Chan's formula (the same
    numbers on every rank)."""
    local = moments(values)
    if group is None:
        return local
    mine = torch.tensor(local, dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    total = Moments(*parts[0].tolist())
    for part in parts[1:]:
        total = combine_moments(total, Moments(*part.tolist()))
    return total


def all_gather_lists(items: list, group: Optional[dist.ProcessGroup]) -> list:
    """The concatenation, in rank order, of every rank's ``items`` (picklable) over ``group``."""
    if group is None:
        return list(items)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, list(items), group=group)
    return [x for part in out for x in part]
