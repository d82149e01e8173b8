"""The lean KV-cached decoder (generation/fast_decode.py) gives megatron's inference path: the same
tokens and log-probs to fp32 rounding, for GPT-2-, Llama- (GQA, RoPE, RMSNorm, SwiGLU, untied
output) and GPT-NeoX-shaped (partial RoPE, parallel residual) models, with ragged left-padded
prompts, greedy and sampled; layouts it does not cover fall back to megatron's path."""
import pytest
import torch

from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
from nemo_rlhf.generation import fast_decode
from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad

SHAPES = {
    "gpt2": dict(),
    "llama": dict(num_query_groups=2, position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                  add_bias_linear=False, share_embeddings_and_output_weights=False, ffn_hidden_size=128),
    "neox": dict(position_embedding_type="rope", rotary_percent=0.25, parallel_residual=True,
                 share_embeddings_and_output_weights=False),
}


def _model(**kw):
    from nemo_rlhf.models.gpt import build_gpt_chunks

    cfg = ModelConfig(**{**dict(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                                seq_length=48, transformer_impl="local"), **kw})
    torch.manual_seed(0)
    model = build_gpt_chunks(cfg, ParallelConfig(), 50)[0].eval()
    with torch.no_grad():   # away from megatron's init (zero biases, ...), so every term matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_fast_decode_equals_megatrons_inference_path(mp, shape, greedy):
    model = _model(**SHAPES[shape])
    assert fast_decode.supported(model)
    ids, lengths = left_pad([[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 13]], 0)
    outs = [generate(model, ids, SamplingParams(20, greedy=greedy, fast_decode=fast, eos_id=1),
                     generator=torch.Generator().manual_seed(1), vocab_size=50, prompt_lengths=lengths)
            for fast in (True, False)]
    assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].mask, outs[1].mask)
    # the biases go into the GEMM (F.linear): the last bits of fp32 differ, nothing more
    assert float((outs[0].logprobs - outs[1].logprobs).abs().max()) < 2e-6
    assert outs[0].mask.sum() > 20                      # rows ran for several steps


def test_fast_decode_hands_the_final_hidden_states_to_a_logits_processor(mp):
    """ILQL's processor reads the forward's final hidden states: the same ones on both paths."""
    model = _model()
    seen = {True: [], False: []}
    for fast in (True, False):
        def processor(logits, hidden, fast=fast):
            seen[fast].append(hidden[-1].clone())
            return logits
        generate(model, torch.tensor([[3, 4], [5, 6]]), SamplingParams(5, greedy=True, fast_decode=fast),
                 vocab_size=50, logits_processor=processor)
    assert len(seen[True]) == 5 and all(float((a - b).abs().max()) < 1e-5 for a, b in zip(seen[True], seen[False]))


def test_layouts_the_fast_path_does_not_cover_fall_back(mp):
    model = _model()
    model.config.sequence_parallel = True        # as a sequence-parallel model's config says
    try:
        assert not fast_decode.supported(model)
    finally:
        model.config.sequence_parallel = False


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_finished_rows_stop_costing_compute_and_change_nothing(mp, shape, greedy, monkeypatch):
    """Rows that reached EOS leave the lean decoder's batch (its cache keeps the others) once a
    quarter of them finished; the outputs are megatron's path's, where every row runs to the end."""
    model = _model(**SHAPES[shape])
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 13], [14, 15, 16], [17], [18, 19], [20, 21, 22, 23]]
    ids, lengths = left_pad(prompts, 0)
    kw = dict(vocab_size=50, prompt_lengths=lengths)
    free = generate(model, ids, SamplingParams(24, greedy=greedy, fast_decode=False),
                    generator=torch.Generator().manual_seed(1), **kw).completions
    # EOS: the token that most rows produce within their first 16 steps, so rows finish at different steps
    eos = max(range(50), key=lambda t: sum(bool((row[:16] == t).any()) for row in free))
    calls = []
    keep_rows = fast_decode.FastDecoder.keep_rows
    monkeypatch.setattr(fast_decode.FastDecoder, "keep_rows", lambda self, rows: (calls.append(len(rows)),
                                                                                   keep_rows(self, rows))[1])
    seen = {True: [], False: []}
    outs = {}
    for fast in (True, False):
        def processor(logits, hidden, fast=fast):   # ILQL-style processors get every row's hidden state
            seen[fast].append(hidden[-1].clone())
            return logits
        outs[fast] = generate(model, ids, SamplingParams(24, greedy=greedy, fast_decode=fast, eos_id=eos),
                              generator=torch.Generator().manual_seed(1), logits_processor=processor, **kw)
    finished = (outs[False].mask.sum(1) < 24).sum()
    assert finished >= 4 and calls and calls == sorted(calls, reverse=True) and calls[-1] < len(prompts)
    assert torch.equal(outs[True].tokens, outs[False].tokens) and torch.equal(outs[True].mask, outs[False].mask)
    assert float((outs[True].logprobs - outs[False].logprobs).abs().max()) < 2e-6
    # rows still running get their own hidden states (finished rows' are never read)
    for a, b, step_mask in zip(seen[True], seen[False], outs[False].mask.t()):
        running = step_mask.bool()
        assert float((a[running] - b[running]).abs().max()) < 1e-5


def test_cpu_decoding_uses_onednn_prepacked_gemms_that_agree_with_f_linear(mp):
    """On a CPU torch wheel (all ship oneDNN) the decoder's GEMMs are prepacked, after a self-check
    of the private ops against F.linear; a weight the check disagrees with turns packing off."""
    model = _model()
    decoder = fast_decode.FastDecoder(model, 4, 16, torch.device("cpu"), torch.float32)
    layers = len(model.decoder.layers)
    assert len(decoder.linear.packed) == 4 * layers + 1          # qkv, proj, fc1, fc2 per layer; output
    weight = model.decoder.layers[0].mlp.linear_fc1.weight
    assert decoder.linear._agrees(weight)
    x, bias = torch.randn(3, weight.shape[1]), torch.randn(weight.shape[0])
    with torch.no_grad():
        assert float((decoder.linear(x, weight, bias, gelu="none")
                      - torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))).abs().max()) < 1e-5
        decoder.linear.packed[id(weight)] = decoder.linear.packed[id(model.decoder.layers[1].mlp.linear_fc1.weight)]
    assert not decoder.linear._agrees(weight)                    # a wrong packed weight is caught
