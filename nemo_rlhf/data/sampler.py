"""Deterministic, resumable batch sampling over the data-parallel rank.

The sample stream is the concatenation of per-epoch permutations (seeded by ``seed + epoch``);
global batch k is stream[k * G : (k + 1) * G], and data-parallel rank r takes its contiguous
slice of it. Every tensor/pipeline-parallel rank of one DP replica therefore sees the same
batch, and resuming at step k continues the exact stream an uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Iterator, List

import torch


class GlobalBatchSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, start_step: int, end_step: int, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("GlobalBatchSampler: the dataset is empty")
        if global_batch_size % dp_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"data-parallel size {dp_size}")
        self.n, self.gbs, self.dp_rank, self.dp_size = num_samples, global_batch_size, dp_rank, dp_size
        self.seed, self.start_step, self.end_step, self.shuffle = seed, start_step, end_step, shuffle
        self._perms = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g)}
            else:
                self._perms = {epoch: torch.arange(self.n)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> List[int]:
        out = []
        for i in range(step * self.gbs, (step + 1) * self.gbs):
            out.append(int(self._perm(i // self.n)[i % self.n]))
        return out

    def __iter__(self) -> Iterator[List[int]]:
        per_rank = self.gbs // self.dp_size
        for step in range(self.start_step, self.end_step):
            batch = self.global_batch(step)
            yield batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)
