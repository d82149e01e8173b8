"""Supervised fine-tuning loss: token-level negative log-likelihood of the completion.

    L = - (1 / N_global) * sum_{i, t} m_{i,t} * log pi(y_{i,t} | y_{i,<t}, x_i)

where m masks prompt and padding tokens and N_global is the number of completion tokens in the
whole global batch (so the loss is a per-token mean, independent of the batch split).
"""
from __future__ import annotations

from typing import Tuple

import torch

from nemo_rlhf.algorithms.reductions import masked_sum


def sft_loss(token_nll: torch.Tensor, loss_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``token_nll`` [B, T]: -log pi of each label token; ``loss_mask`` [B, T] in {0, 1}.

    Returns (sum of the masked NLL, number of valid tokens as int). The caller divides by the
    global token count (megatron's ``calculate_per_token_loss`` does so for the gradients)."""
    if token_nll.shape != loss_mask.shape:
        raise ValueError(f"token_nll {tuple(token_nll.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    return masked_sum(token_nll.float(), loss_mask), loss_mask.sum().to(torch.int)
