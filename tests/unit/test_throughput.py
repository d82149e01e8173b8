"""Throughput logs: the model-FLOPs count per token, derived by hand, and the tokens/s + MFU record."""
import json

import pytest

from nemo_rlhf.config.model import ModelConfig
from nemo_rlhf.modules.throughput import flops_per_token, throughput


def test_flops_per_token_by_hand():
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, seq_length=16)
    # one layer's weights: QKV 3h^2 + 3h, projection h^2 + h, MLP 2 h ffn + ffn + h, two LayerNorms 4h
    per_layer = 3 * 64 ** 2 + 3 * 64 + 64 ** 2 + 64 + 2 * 64 * 256 + 256 + 64 + 4 * 64
    assert per_layer == 49984
    matmul = 2 * per_layer + 64 * 64              # + the LM head: vocab 21 padded to 64 rows
    forward = 2 * matmul + 4 * 2 * 16 * 64        # + scores and their product with V: 4 L s h
    assert flops_per_token(m, vocab_size=21, seq_length=16, training=False) == forward == 216320
    assert flops_per_token(m, vocab_size=21, seq_length=16) == 3 * forward


def test_throughput_record():
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, seq_length=16)
    out = throughput(1000, 2.0, m, 21, 16, world_size=2, peak=1e6)
    assert out["tokens_per_s"] == 500
    assert out["mfu"] == pytest.approx(500 * 3 * 216320 / 2e6)
    assert "mfu" not in throughput(1000, 2.0, m, 21, 16, world_size=2, peak=None)   # CPU: no peak
    assert throughput(0, 2.0, m, 21, 16, 1, None) == {}
