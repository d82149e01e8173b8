"""T5 policies: the causal <-> encoder/decoder layout (hand-derived), the T5 forward against megatron's
own call, training NLL against sampling log-probs, heads on the decoder, config errors."""
import dataclasses

import pytest
import torch

from nemo_rlhf.config.schema import ConfigError, ModelConfig, ParallelConfig, RunConfig
from nemo_rlhf.models.t5 import CausalLayout, attention_masks, split_causal_batch

T5 = ModelConfig(arch="t5", num_layers=2, encoder_num_layers=1, hidden_size=32, num_attention_heads=4,
                 ffn_hidden_size=64, seq_length=8)


def test_split_causal_batch_by_hand():
    # row 0: prompt [5], completion [6, 7], EOS 1;  row 1: prompt [5, 8, 9], completion [4], EOS 1
    tokens = torch.tensor([[5, 6, 7, 1, 0, 0], [5, 8, 9, 4, 1, 0]])
    labels = torch.tensor([[6, 7, 1, 0, 0, 0], [8, 9, 4, 1, 0, 0]])
    mask = torch.tensor([[1., 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
    b = split_causal_batch(tokens, labels, mask, pad_id=0, start_id=0)
    assert b.enc_tokens.tolist() == [[5, 0, 0], [5, 8, 9]]
    assert b.enc_valid.tolist() == [[True, False, False], [True, True, True]]
    # decoder length S - (shortest prompt - 1) = 6; labels from each prompt's end
    assert b.dec_labels.tolist() == [[6, 7, 1, 0, 0, 0], [4, 1, 0, 0, 0, 0]]
    assert b.dec_tokens.tolist() == [[0, 6, 7, 1, 0, 0], [0, 4, 1, 0, 0, 0]]
    assert b.dec_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert b.layout.offset.tolist() == [0, 2]
    # decoder positions back to the causal layout: row 1 shifts right by 2, prompt positions are 0
    x = torch.arange(1., 13.).view(2, 6)
    assert b.layout.to_causal(x).tolist() == [[1, 2, 3, 4, 5, 6], [0, 0, 7, 8, 9, 10]]
    # and the round trip reproduces the labels where the mask is 1
    assert torch.equal(b.layout.to_causal(b.dec_labels) * mask.long(), labels * mask.long())


def test_causal_layout_keeps_trailing_dims():
    layout = CausalLayout(offset=torch.tensor([1]), seq_length=3)
    x = torch.tensor([[[1., 2.], [3., 4.], [5., 6.]]])          # [1, Sd=3, 2]
    assert layout.to_causal(x).tolist() == [[[0, 0], [1, 2], [3, 4]]]


def test_split_causal_batch_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must be \\[N, S\\] alike"):
        split_causal_batch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4))


def test_attention_masks_block_padded_prompt_keys():
    enc, cross = attention_masks(torch.tensor([[True, False]]), 3)
    assert enc.shape == (1, 1, 2, 2) and cross.shape == (1, 1, 3, 2)
    assert cross[0, 0].tolist() == [[False, True]] * 3


@pytest.fixture
def t5(mp):
    from nemo_rlhf.models.t5 import build_t5_chunks

    torch.manual_seed(0)
    return build_t5_chunks(T5, ParallelConfig(), vocab_size=12)[0]


def _batch():
    tokens = torch.tensor([[5, 6, 7, 1, 0, 0, 0, 0], [5, 8, 9, 4, 1, 0, 0, 0]])
    labels = torch.cat([tokens[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1)
    mask = torch.tensor([[1., 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]])
    return tokens, labels, mask


def test_t5_builds_with_final_layernorms_and_its_depths(t5):
    assert t5.encoder.final_layernorm is not None and t5.decoder.final_layernorm is not None
    assert len(t5.encoder.layers) == 1 and len(t5.decoder.layers) == 2


def test_lm_forward_on_t5_equals_log_softmax_of_megatron_logits(t5):
    from nemo_rlhf.modules.engine import lm_forward

    tokens, labels, mask = _batch()
    nll = lm_forward(t5, tokens, labels, mask)                       # causal layout [2, 8]
    assert nll.shape == (2, 8)
    # by hand: row 1's encoder gets [5, 8, 9], its decoder [start, 4], predicting [4, EOS]
    for row, prompt, completion in ((0, [5], [6, 7, 1]), (1, [5, 8, 9], [4, 1])):
        enc = torch.tensor([prompt])
        dec = torch.tensor([[0] + completion[:-1]])
        enc_mask, cross = attention_masks(torch.ones_like(enc, dtype=torch.bool), dec.shape[1])
        logits = t5(enc, dec, enc_mask, None, cross)                # [1, len, V]
        want = -torch.log_softmax(logits.float(), -1)[0].gather(-1, torch.tensor(completion)[:, None])[:, 0]
        start = len(prompt) - 1
        got = nll[row, start:start + len(completion)]
        assert torch.allclose(got, want, atol=1e-5), (row, got, want)
    assert float(nll[1, :2].abs().sum()) == 0.0                        # prompt positions


def test_sampled_logprobs_equal_training_nll_and_padding_is_invisible(t5):
    from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad
    from nemo_rlhf.modules.engine import lm_forward

    prompts, lengths = left_pad([[5, 8, 9], [6]], pad_id=0)
    params = SamplingParams(max_new_tokens=4, eos_id=1, pad_id=0)
    out = generate(t5, prompts, params, generator=torch.Generator().manual_seed(3), prompt_lengths=lengths,
                   vocab_size=12)
    assert out.tokens.shape == (2, 7) and out.tokens[1, :2].tolist() == [0, 0]
    assert int(out.tokens[:, 3:].max()) < 12                           # never the padded vocab tail
    # row 1 alone (unpadded) samples the same tokens with the same log-probs
    alone = generate(t5, torch.tensor([[6]]), params, generator=torch.Generator().manual_seed(3), vocab_size=12)
    # (same generator stream only for the first row: compare greedy instead for the padded row)
    greedy = SamplingParams(max_new_tokens=4, greedy=True, pad_id=0)
    padded = generate(t5, prompts, greedy, prompt_lengths=lengths)
    single = generate(t5, torch.tensor([[6]]), greedy)
    assert padded.tokens[1, 3:].tolist() == single.tokens[0, 1:].tolist()
    assert torch.allclose(padded.logprobs[1], single.logprobs[0], atol=1e-5)
    assert alone.tokens.shape == (1, 5)
    with pytest.raises(ValueError, match="max_new_tokens=8 .* do not fit"):       # seq_length 8
        generate(t5, prompts, SamplingParams(max_new_tokens=8))
    # the log-probs of sampling equal -NLL of the same tokens in a training forward (unmasked vocab:
    # vocab_size renormalises sampling over the real tokens, the training NLL covers the padded vocab)
    out = generate(t5, prompts[:1], params, generator=torch.Generator().manual_seed(4))
    seq = out.tokens                                                  # [1, 3 + 4]
    inputs, labels = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.float32)
    mask[:, 2:] = out.mask                                            # label t is new token t - 2
    nll = lm_forward(t5, inputs, labels, mask)
    got = -(nll * mask)[0, 2:]
    want = out.logprobs[0] * out.mask[0]
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_value_head_on_the_t5_decoder_returns_the_causal_layout(t5):
    from nemo_rlhf.models.heads import attach_value_head, value_head_output
    from nemo_rlhf.modules.engine import lm_forward_with_states

    head = attach_value_head(t5, T5.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    assert not t5.decoder._forward_hooks
    tokens, _, mask = _batch()
    nll, states = lm_forward_with_states(t5, tokens, None, mask)
    assert nll is None and states.hidden.shape == (8, 2, T5.hidden_size)      # [Sd, N, H]: decoder positions
    values = value_head_output(t5, states)
    assert values.shape == (2, 8)
    assert float(values[1, :2].abs().sum()) == 0.0 and float(values[1, 2:6].abs().min()) > 0.0


@pytest.mark.parametrize("positions", ["learned_absolute", "relative"])
def test_t5_decode_is_megatrons_decoder_half_exactly(mp, positions):
    """t5_decode repeats T5Model.forward's decoder half (to hand the heads its hidden states): same
    logits and per-token loss as megatron's own call, bit for bit."""
    from nemo_rlhf.models.t5 import build_t5_chunks, t5_decode

    torch.manual_seed(0)
    t5 = build_t5_chunks(dataclasses.replace(T5, position_embedding_type=positions), ParallelConfig(),
                         vocab_size=12)[0].eval()
    b = split_causal_batch(*_batch())
    enc_mask, cross = attention_masks(b.enc_valid, b.dec_tokens.shape[1])
    with torch.no_grad():
        enc = t5(b.enc_tokens, None, enc_mask, None, None, output_encoder_hidden_only=True)
        for labels in (None, b.dec_labels):
            got, hidden = t5_decode(t5, b.dec_tokens, enc, None, cross, lm_labels=labels)
            assert torch.equal(got, t5(b.enc_tokens, b.dec_tokens, enc_mask, None, cross, lm_labels=labels))
    assert hidden.shape == (b.dec_tokens.shape[1], 2, T5.hidden_size)


def test_config_errors_name_the_key(dist1):
    from nemo_rlhf.config.schema import ParallelConfig as P

    t5 = dataclasses.replace(T5, seq_length=16)
    with pytest.raises(ConfigError, match="model.arch=t5 needs parallel.pipeline_model_parallel_size=1"):
        RunConfig(model=t5, parallel=P(pipeline_model_parallel_size=2))
    with pytest.raises(ConfigError, match="model.arch must be gpt\\|t5"):
        ModelConfig(arch="bart")
    with pytest.raises(ConfigError, match="needs model.arch=t5"):
        ModelConfig(position_embedding_type="relative")
    from nemo_rlhf.recipes.registry import validate, with_algorithm

    with pytest.raises(ConfigError, match="algorithm.name sft\\|ppo\\|ilql\\|dpo\\|kto, got 'rm'"):
        validate(with_algorithm(RunConfig(model=t5), "rm"))
    validate(with_algorithm(RunConfig(model=t5), "dpo"))                  # fine
    validate(with_algorithm(RunConfig(model=t5), "kto"))                  # fine
    with pytest.raises(ConfigError, match="are arch=t5 settings"):
        ModelConfig(kv_channels=8)


def test_relative_attention_bias_on_the_local_attention_trains(mp):
    """megatron's local DotProductAttention refuses attention_bias; ours adds it to the scores."""
    from nemo_rlhf.models.t5 import build_t5_chunks
    from nemo_rlhf.modules.engine import lm_forward

    torch.manual_seed(0)
    cfg = dataclasses.replace(T5, position_embedding_type="relative", kv_channels=4, attention_softmax_scale=1.0)
    t5 = build_t5_chunks(cfg, ParallelConfig(), vocab_size=12)[0]
    attn = t5.encoder.layers[0].self_attention.core_attention
    assert type(attn).__name__ == "DotProductAttentionWithBias" and attn.softmax_scale == 1.0
    tokens, labels, mask = _batch()
    nll = lm_forward(t5, tokens, labels, mask)
    (nll * mask).sum().backward()
    for emb in (t5.encoder_relative_pos_emb, t5.decoder_relative_pos_emb):
        assert float(emb.relative_attention_bias.weight.grad.norm()) > 0
    # the bias matters: zeroing it changes the output
    with torch.no_grad():
        for emb in (t5.encoder_relative_pos_emb, t5.decoder_relative_pos_emb):
            emb.relative_attention_bias.weight.zero_()
        assert not torch.allclose(lm_forward(t5, tokens, labels, mask), nll)


@pytest.mark.parametrize("positions", ["learned_absolute", "relative"])
def test_kv_cached_decoding_equals_rerunning_the_decoder(mp, positions):
    from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad
    from nemo_rlhf.models.t5 import build_t5_chunks

    torch.manual_seed(0)
    t5 = build_t5_chunks(dataclasses.replace(T5, position_embedding_type=positions, seq_length=12),
                         ParallelConfig(), vocab_size=12)[0]
    prompts, lengths = left_pad([[5, 8, 9], [6], [7, 4]], pad_id=0)
    out = {}
    for cache in (True, False):
        out[cache] = generate(t5, prompts, SamplingParams(max_new_tokens=10, use_kv_cache=cache),
                              generator=torch.Generator().manual_seed(2), prompt_lengths=lengths)
    assert len(set(out[True].tokens[:, 3:].flatten().tolist())) > 3        # real samples, not one token
    assert torch.equal(out[True].tokens, out[False].tokens)
    assert (out[True].logprobs - out[False].logprobs).abs().max() < 1e-5
