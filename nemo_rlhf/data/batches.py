"""The batches every trainer consumes: one naming scheme, shapes documented once.

Every batch is a dict of tensors (what DataLoader collation and megatron's forward-step functions
pass around); these TypedDicts name its keys. The same key means the same thing everywhere:

    tokens     [B, S] (or [B, 2, S])  input token ids, right-padded (PPO rollouts: prompts left-padded)
    labels     [B, S]                 tokens shifted left: labels[:, t] = tokens[:, t + 1]
    loss_mask  [B, S]                 1 where labels[:, t] is a completion token the loss covers

B = micro-batch (or dataset) rows, S = model.seq_length; a preference batch stacks two
sequences per example on dimension 1 (index 0 = chosen / the completion, 1 = rejected / the
mismatched completion of KTO).
"""
from __future__ import annotations

from typing import TypedDict

import torch


class LMBatch(TypedDict):
    """SFT and every other batch's common keys."""

    tokens: torch.Tensor      # [B, S]
    labels: torch.Tensor      # [B, S]
    loss_mask: torch.Tensor   # [B, S]


class PreferenceBatch(TypedDict, total=False):
    """DPO family, KTO and reward models: two sequences per example."""

    tokens: torch.Tensor      # [B, 2, S]
    labels: torch.Tensor      # [B, 2, S]
    loss_mask: torch.Tensor   # [B, 2, S]
    ref_logps: torch.Tensor   # [B, 2] reference log-probs (precomputed reference)
    desirable: torch.Tensor   # [B] KTO: 1 = desirable completion


class ILQLBatch(TypedDict):
    """ILQL: loss_mask marks the states whose action (labels) is a completion token."""

    tokens: torch.Tensor            # [B, S]
    labels: torch.Tensor            # [B, S] the action taken at each state
    loss_mask: torch.Tensor         # [B, S]
    rewards: torch.Tensor           # [B, S] the sequence's (normalised) reward on its last action
    next_nonterminal: torch.Tensor  # [B, S] 0 where the next state is terminal
