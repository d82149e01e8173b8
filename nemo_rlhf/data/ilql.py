"""Offline RL data for ILQL: (sample, reward) pairs as padded tensors, from Python lists or JSONL.

A sample is a string or a [prompt, completion] pair (trlX's convention). A plain string's first
token is its prompt. Per sequence of L tokens (prompt + completion + EOS) the states are the
positions 0..L-1; the action at state t is token t+1; only completion tokens are actions. The
sequence reward sits on the last action; the state after it (EOS) is terminal.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import torch

from nemo_rlhf.data.batches import ILQLBatch

Sample = Union[str, Sequence[str]]


from nemo_rlhf.errors import DataError  # noqa: F401  (re-exported)


def load_jsonl_samples(path: str | Path) -> Tuple[List[Sample], List[float]]:
    """{"sample": str | [prompt, completion], "reward": number} per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    samples, rewards = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "sample" not in rec or "reward" not in rec:
                raise DataError(f"{path}:{lineno}: expected an object with 'sample' and 'reward' fields")
            s, r = rec["sample"], rec["reward"]
            if not (isinstance(s, str) or (isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s))):
                raise DataError(f"{path}:{lineno}: 'sample' must be a string or a [prompt, completion] pair")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise DataError(f"{path}:{lineno}: 'reward' must be a finite number, got {r!r}")
            samples.append(s)
            rewards.append(float(r))
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples, rewards


@dataclass
class ILQLDataset(torch.utils.data.Dataset):
    tokens: torch.Tensor           # [N, S] right-padded
    labels: torch.Tensor           # [N, S] tokens shifted left (action at state t), pad at the end
    loss_mask: torch.Tensor        # [N, S] 1 at states whose action is a completion token
    rewards: torch.Tensor          # [N, S] sequence reward on the last action
    next_nonterminal: torch.Tensor  # [N, S] 0 where the next state is terminal

    def __len__(self):
        return self.tokens.shape[0]

    def __getitem__(self, i) -> ILQLBatch:
        return {k: getattr(self, k)[i] for k in ILQLBatch.__annotations__}

    @classmethod
    def build(cls, samples: Sequence[Sample], rewards: Sequence[float], tokenizer, seq_length: int,
              normalization: str = "standard") -> "ILQLDataset":
        if len(samples) != len(rewards):
            raise DataError(f"{len(samples)} samples but {len(rewards)} rewards")
        if not samples:
            raise DataError("no samples")
        r = torch.tensor([float(x) for x in rewards])
        if not torch.isfinite(r).all():
            raise DataError(f"reward {int((~torch.isfinite(r)).nonzero()[0])} is not finite")
        if normalization == "standard" and len(r) > 1:
            r = (r - r.mean()) / (r.std() + 1e-8)
        n = len(samples)
        tokens = torch.full((n, seq_length), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(n, seq_length)
        rew = torch.zeros(n, seq_length)
        nonterminal = torch.ones(n, seq_length)
        for i, s in enumerate(samples):
            prompt, completion = (s[:1], s[1:]) if isinstance(s, str) else s
            try:
                p_ids, c_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
            except ValueError as e:
                raise DataError(f"sample {i}: {e}") from None
            if not p_ids:
                raise DataError(f"sample {i}: empty prompt")
            seq = p_ids + c_ids + [tokenizer.eos_id]
            if len(seq) > seq_length:
                raise DataError(f"sample {i} has {len(seq)} tokens, more than model.seq_length={seq_length}")
            length, p = len(seq), len(p_ids)
            tokens[i, :length] = torch.tensor(seq)
            mask[i, p - 1:length - 1] = 1.0        # states p-1 .. L-2 take completion actions
            rew[i, length - 2] = r[i]              # reward on the last action (EOS)
            nonterminal[i, length - 2:] = 0.0      # the state after EOS is terminal
        labels = torch.cat([tokens[:, 1:], torch.full((n, 1), tokenizer.pad_id, dtype=torch.long)], 1)
        return cls(tokens, labels, mask, rew, nonterminal)
