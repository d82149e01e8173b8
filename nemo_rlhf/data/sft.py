"""Prompt/completion data for supervised fine-tuning, as padded token tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from nemo_rlhf.data.batches import LMBatch


@dataclass
class SFTDataset(torch.utils.data.Dataset):
    """Right-padded sequences; the loss covers completion tokens (EOS included) only.

    tokens    [N, S]  prompt + completion + EOS, then pad
    labels    [N, S]  tokens shifted left by one (labels[:, t] = tokens[:, t + 1])
    loss_mask [N, S]  1 where labels[:, t] is a completion token, else 0
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> LMBatch:
        return {"tokens": self.tokens[i], "labels": self.labels[i], "loss_mask": self.loss_mask[i]}

    @classmethod
    def from_pairs(cls, pairs: Sequence[Tuple[List[int], List[int]]], seq_length: int, pad_id: int,
                   eos_id: int, add_eos: bool = True) -> "SFTDataset":
        """``pairs`` of (prompt ids, completion ids); EOS is appended unless ``add_eos=False``
        (the file loader appends it itself, and leaves it off truncated completions)."""
        n = len(pairs)
        tokens = torch.full((n, seq_length + 1), pad_id, dtype=torch.long)
        mask = torch.zeros((n, seq_length + 1), dtype=torch.float32)
        for i, (prompt, completion) in enumerate(pairs):
            seq = list(prompt) + list(completion) + ([eos_id] if add_eos else [])
            if len(seq) > seq_length + 1:
                raise ValueError(f"example {i} has {len(seq)} tokens (prompt + completion + EOS), "
                                 f"more than seq_length + 1 = {seq_length + 1}")
            tokens[i, :len(seq)] = torch.tensor(seq)
            mask[i, len(prompt):len(seq)] = 1.0  # positions of completion tokens in `tokens`
        # input/label alignment: predict tokens[t + 1] from tokens[:t + 1]
        return cls(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                   loss_mask=mask[:, 1:].contiguous())
