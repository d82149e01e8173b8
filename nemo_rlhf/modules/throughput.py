"""Throughput in every run's log: tokens per second and, where the device's peak is known, the
model FLOP utilisation (MFU).

Tokens are the positions a model computes in a training step (rows x the width after dynamic
padding, over all data-parallel ranks: what the engine reports as ``model_tokens``). Model FLOPs
per token follow the usual dense-transformer count (Kaplan et al. 2020; Narayanan et al. 2021):
2 FLOPs per matmul weight per token forward (layers and LM head; embedding lookups are free) plus
the attention scores and their product with V (2 x 2 x seq x hidden per layer forward), three
times that for forward + backward. Recomputed activations are not counted (MFU, not HFU).
"""
from __future__ import annotations

from typing import Optional

import torch

from nemo_rlhf.config.model import ModelConfig

PEAK_FLOPS_16BIT = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
                    "L4": 121e12, "V100": 125e12}
"""Dense bf16 / fp16 tensor-core peak per GPU (vendor datasheets, SXM parts), by a name fragment
of ``torch.cuda.get_device_name()``."""


def flops_per_token(m: ModelConfig, vocab_size: int, seq_length: int, training: bool = True) -> float:
    """Model FLOPs per token of a GPT forward (x3 with the backward when ``training``)."""
    from nemo_rlhf.planning.memory import padded_vocab, param_count

    count = param_count(m, vocab_size)
    matmul_weights = m.num_layers * count.per_layer + padded_vocab(vocab_size, m.make_vocab_size_divisible_by) * m.hidden_size
    attention = 4 * m.num_layers * seq_length * m.hidden_size
    forward = 2 * matmul_weights + attention
    return 3 * forward if training else forward


def peak_flops(model: ModelConfig) -> Optional[float]:
    """This device's peak for the model's precision, or None (CPU, fp32, an unlisted GPU)."""
    if not torch.cuda.is_available() or model.precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS_16BIT.items() if k in name), None)


def throughput(tokens: float, seconds: float, model: ModelConfig, vocab_size: int, seq_length: int,
               world_size: int, peak: Optional[float]) -> dict:
    """{"tokens_per_s": ..., "mfu": ...} (mfu only with a known peak)."""
    if seconds <= 0 or tokens <= 0:
        return {}
    rate = tokens / seconds
    out = {"tokens_per_s": rate}
    if peak:
        out["mfu"] = rate * flops_per_token(model, vocab_size, seq_length) / (peak * world_size)
    return out
