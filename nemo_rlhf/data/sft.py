"""Prompt/completion data for supervised fine-tuning, as padded token tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from nemo_rlhf.data.batches import LMBatch


@dataclass
class SFTDataset(torch.utils.data.Dataset):
    """Right-padded sequences; the loss covers completion tokens (EOS included) only.

    tokens    [N, S]  prompt + completion + EOS, then pad
    labels    [N, S]  tokens shifted left by one (labels[:, t] = tokens[:, t + 1])
    loss_mask [N, S]  1 where labels[:, t] is a completion token, else 0
    segment_ids [N, S]  packed rows only (:meth:`packed`): 1, 2, ... the example each position
              belongs to, 0 on padding; attention stays inside an example and positions restart
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    segment_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> LMBatch:
        item = {"tokens": self.tokens[i], "labels": self.labels[i], "loss_mask": self.loss_mask[i]}
        if self.segment_ids is not None:
            item["segment_ids"] = self.segment_ids[i]
        return item

    @classmethod
    def packed(cls, pairs: Sequence[Tuple[List[int], List[int]]], seq_length: int, pad_id: int,
               eos_id: int, add_eos: bool = True) -> "SFTDataset":
        """Several examples per row: each example contributes its (input, label) positions -- the
        pairs :meth:`from_pairs` would give it, never a label across two examples -- and rows are
        filled first-fit in order of decreasing length, so the loss is the unpacked one over fewer,
        fuller rows. ``segment_ids`` keep each example's attention and positions to itself."""
        examples = cls.from_pairs(pairs, seq_length, pad_id, eos_id, add_eos)
        lengths = (examples.tokens != pad_id).long().sum(1)
        # real positions of an example: up to its last label (the EOS), padding ids included if any
        last = torch.where(examples.loss_mask.sum(1) > 0,
                           seq_length - 1 - examples.loss_mask.flip(1).argmax(1), lengths - 1)
        sizes = (last + 1).tolist()
        rows: List[List[int]] = []
        room: List[int] = []
        for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
            row = next((r for r, free in enumerate(room) if free >= sizes[i]), None)
            if row is None:
                rows.append([]), room.append(seq_length)
                row = len(rows) - 1
            rows[row].append(i)
            room[row] -= sizes[i]
        n = len(rows)
        tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
        labels = torch.full((n, seq_length), pad_id, dtype=torch.long)
        mask = torch.zeros((n, seq_length))
        segments = torch.zeros((n, seq_length), dtype=torch.long)
        for r, members in enumerate(rows):
            at = 0
            for k, i in enumerate(members, start=1):
                size = sizes[i]
                tokens[r, at:at + size] = examples.tokens[i, :size]
                labels[r, at:at + size] = examples.labels[i, :size]
                mask[r, at:at + size] = examples.loss_mask[i, :size]
                segments[r, at:at + size] = k
                at += size
        return cls(tokens=tokens, labels=labels, loss_mask=mask, segment_ids=segments)

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
