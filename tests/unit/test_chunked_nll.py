"""Per-token NLL with the logits computed a chunk of tokens at a time (algorithms/chunked_nll.py,
model.logits_chunk_tokens): the values and gradients of the whole-vocabulary cross-entropy, while
nothing of tokens x vocabulary size is kept for the backward. Tensor / sequence / pipeline
parallel layouts: tests/distributed (chunked_logits_*)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nemo_rlhf.algorithms.chunked_nll import chunked_nll
from nemo_rlhf.config.schema import ConfigError, ModelConfig, ParallelConfig


def test_values_by_hand():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, -1.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # logits: [1, 0, 0], [0, 0, 0], [2, -1, 0]
    nll = chunked_nll(hidden, weight, torch.tensor([0, 2, 1]), chunk=2)
    expected = [math.log(math.e + 2) - 1, math.log(3), math.log(math.e ** 2 + math.e ** -1 + 1) + 1]
    assert torch.allclose(nll, torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_values_and_gradients_equal_the_whole_vocabulary_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (10,), generator=g)
    upstream = torch.rand(10, generator=g)          # per-token weights, as a loss mask makes them
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="none")
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    nll = chunked_nll(hidden, weight, labels, chunk)
    grads = torch.autograd.grad((nll * upstream).sum(), (hidden, weight))
    assert float((nll - ref).abs().max()) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert float((got - want).abs().max()) < 1e-6


def test_bf16_follows_megatrons_bf16_logits():
    """bf16 weights (model.precision=bf16): logits from the bf16 GEMM, cast to fp32 for the softmax
    as megatron's cross-entropy does; gradients come back in bf16."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=g).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(40, 16, generator=g)).bfloat16().requires_grad_()
    labels = torch.randint(0, 40, (12,), generator=g)
    ref = F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="none")
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight))
    nll = chunked_nll(hidden, weight, labels, 5)
    grads = torch.autograd.grad(nll.sum(), (hidden, weight))
    assert nll.dtype == torch.float32 and float((nll - ref).abs().max()) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16 and float((got.float() - want.float()).abs().max()) < 2e-2


def _largest_saved(fn) -> int:
    """numel of the largest tensor autograd keeps for the backward while ``fn`` runs"""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_keeps_no_logits_for_the_backward():
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(500, 16, requires_grad=True)
    labels = torch.randint(0, 500, (64,))
    whole = _largest_saved(lambda: F.cross_entropy(hidden @ weight.t(), labels, reduction="none"))
    chunked = _largest_saved(lambda: chunked_nll(hidden, weight, labels, 8))
    assert whole >= 64 * 500                        # the usual path keeps tokens x vocabulary
    assert chunked == 500 * 16                      # here: the inputs (weight the largest), nothing more


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="chunk must be a positive"):
        chunked_nll(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="hidden \\[N, H\\] and labels \\[N\\]"):
        chunked_nll(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ConfigError, match="logits_chunk_tokens must be null or a positive"):
        ModelConfig(logits_chunk_tokens=0)
    with pytest.raises(ConfigError, match="logits_chunk_tokens is a GPT option"):
        ModelConfig(arch="t5", logits_chunk_tokens=8)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_forward_in_chunks_equals_megatrons_output_layer_and_cross_entropy(mp, tied):
    """The GPT of every trainer (models/gpt.gpt_forward with labels): NLL and every parameter's
    gradient equal megatron's _postprocess on the same weights; the largest tensor kept for the
    backward shrinks from the [S, B, V] logits to the weights'."""
    import dataclasses

    from nemo_rlhf.models.gpt import build_gpt_chunks, gpt_forward

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=24,
                      transformer_impl="local", share_embeddings_and_output_weights=tied)
    torch.manual_seed(0)
    whole = build_gpt_chunks(cfg, ParallelConfig(), 1000)[0]
    torch.manual_seed(0)
    chunked = build_gpt_chunks(dataclasses.replace(cfg, logits_chunk_tokens=7), ParallelConfig(), 1000)[0]
    chunked.load_state_dict(whole.state_dict())
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 1000, (4, 24), generator=g), torch.randint(0, 1000, (4, 24), generator=g)
    pos = torch.arange(24).expand_as(tokens)
    mask = torch.rand(4, 24, generator=g)
    results = {}
    for name, model in (("whole", whole), ("chunked", chunked)):
        box = {}
        results[name] = box
        box["saved"] = _largest_saved(lambda: box.update(nll=gpt_forward(model, tokens, pos, None, labels=labels)[0]))
        (box["nll"] * mask).sum().backward()
        box["grads"] = {n: p.grad for n, p in model.named_parameters()}
    assert results["chunked"]["nll"].shape == (4, 24)
    assert float((results["chunked"]["nll"] - results["whole"]["nll"]).abs().max()) < 1e-5
    for n, grad in results["whole"]["grads"].items():
        assert float((results["chunked"]["grads"][n] - grad).abs().max()) < 1e-5, n
    padded_vocab = whole.output_layer.weight.shape[0] if not tied else whole.embedding.word_embeddings.weight.shape[0]
    assert results["whole"]["saved"] >= 4 * 24 * padded_vocab
    assert results["chunked"]["saved"] < 4 * 24 * padded_vocab / 2
