"""Hugging Face T5 -> megatron T5Model: logits equal transformers' on tiny random models built
locally (T5 v1.0: relu, tied head with the d_model**-0.5 output scale; v1.1 / flan-T5: gated
tanh-gelu, no output scale, and an untied head), relative attention bias included, with padding."""
import dataclasses

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from nemo_rlhf.config.schema import ConfigError, ModelConfig, ParallelConfig
from nemo_rlhf.interop.hf_t5 import (hf_t5_to_megatron, import_hf_t5, lm_head_is_tied, load_hf_t5,
                                     model_config_from_hf_t5)

V = 90


def _hf(variant):
    cfg = T5Config(vocab_size=V, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                   feed_forward_proj="relu" if variant == "v1.0" else "gated-gelu",
                   tie_word_embeddings=variant == "v1.0", decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # HF init leaves norms at 1: perturb them so a swapped norm shows
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    if variant == "v1.1":   # flan-T5 checkpoints carry their own lm_head (transformers 5 ties it on build)
        model.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn(V, 32))
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(2, V, (2, 11), generator=g)
    dec = torch.randint(2, V, (2, 7), generator=g)
    dec[:, 0] = 0
    enc_valid = torch.ones(2, 11, dtype=torch.bool)
    enc_valid[1, 8:] = False               # a padded prompt
    return enc, dec, enc_valid


def _megatron_logits(t5, enc, dec, enc_valid):
    from nemo_rlhf.models.t5 import attention_masks

    enc_mask, cross = attention_masks(enc_valid, dec.shape[1])
    with torch.no_grad():
        return t5(enc, dec, enc_mask, None, cross)[..., :V]


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_imported_hf_t5_logits_equal_transformers(mp, variant):
    from nemo_rlhf.models.t5 import build_t5_chunks

    hf = _hf(variant)
    hf_cfg = hf.config.to_dict()
    sd = hf.state_dict()
    tied = lm_head_is_tied(sd)
    assert tied == (variant == "v1.0")
    model = model_config_from_hf_t5(hf_cfg, ModelConfig(seq_length=16), tied=tied)
    t5 = build_t5_chunks(model, ParallelConfig(), V)[0].eval()
    load_hf_t5(hf_t5_to_megatron(sd, hf_cfg, t5.vocab_size), t5, gated=variant == "v1.1")
    enc, dec, enc_valid = _inputs()
    with torch.no_grad():
        want = hf(input_ids=enc, attention_mask=enc_valid.long(), decoder_input_ids=dec).logits
    got = _megatron_logits(t5, enc, dec, enc_valid)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() < 2e-6, float((got - want).abs().max())   # measured 1.1e-6 / 4e-7


def test_import_from_a_saved_directory_and_named_errors(mp, tmp_path):
    from nemo_rlhf.interop.hf_config import read_hf_config
    from nemo_rlhf.models.t5 import build_t5_chunks

    hf = _hf("v1.0")
    hf.save_pretrained(tmp_path)
    from nemo_rlhf.weights import load_weights
    from nemo_rlhf.interop.formats import resolve_model_config

    # model.path=<HF T5 dir> with model.arch=t5: the architecture comes from config.json + weights
    model = resolve_model_config(ModelConfig(arch="t5", path=str(tmp_path), seq_length=16))
    assert model == model_config_from_hf_t5(read_hf_config(tmp_path), ModelConfig(seq_length=16, path=str(tmp_path)))
    t5 = build_t5_chunks(model, ParallelConfig(), V)[0].eval()
    load_weights(tmp_path, [t5])                     # the loader every trainer uses
    enc, dec, enc_valid = _inputs()
    with torch.no_grad():
        want = hf(input_ids=enc, attention_mask=enc_valid.long(), decoder_input_ids=dec).logits
    assert (_megatron_logits(t5, enc, dec, enc_valid) - want).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="share_embeddings_and_output_weights=True"):
        import_hf_t5(tmp_path, [t5], dataclasses.replace(model, share_embeddings_and_output_weights=False))
    with pytest.raises(ConfigError, match="feed_forward_proj='gated-relu' is not supported"):
        model_config_from_hf_t5({**hf.config.to_dict(), "feed_forward_proj": "gated-relu"})
    with pytest.raises(ConfigError, match="model_type='mt5'"):
        model_config_from_hf_t5({**hf.config.to_dict(), "model_type": "mt5"})


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_export_reloads_in_transformers_with_the_same_logits(mp, tmp_path, variant):
    from transformers import AutoModelForSeq2SeqLM

    from nemo_rlhf.interop import export_hf
    from nemo_rlhf.models.t5 import build_t5_chunks

    hf = _hf(variant)
    sd, hf_cfg = hf.state_dict(), hf.config.to_dict()
    model = model_config_from_hf_t5(hf_cfg, ModelConfig(seq_length=16), tied=lm_head_is_tied(sd))
    t5 = build_t5_chunks(model, ParallelConfig(), V)[0].eval()
    load_hf_t5(hf_t5_to_megatron(sd, hf_cfg, t5.vocab_size), t5, gated=variant == "v1.1")
    if variant == "v1.0":   # the tied head's megatron-only bias stays 0 through training
        assert not t5.lm_head.output_layer.bias.requires_grad
    with torch.no_grad():   # a "trained" model: move every exported weight
        for n, p in t5.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    enc, dec, enc_valid = _inputs()
    ours = _megatron_logits(t5, enc, dec, enc_valid)
    out = export_hf(tmp_path / "export", [t5], model, V)
    back = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert (back.lm_head.weight is back.shared.weight) == (variant == "v1.0")
    with torch.no_grad():
        theirs = back(input_ids=enc, attention_mask=enc_valid.long(), decoder_input_ids=dec).logits
    assert (ours - theirs).abs().max() < 2e-6, float((ours - theirs).abs().max())
    # and HF T5 cannot express ours: a named error, nothing written
    with pytest.raises(ConfigError, match="model.position_embedding_type='relative'"):
        export_hf(tmp_path / "bad", [t5], dataclasses.replace(model, position_embedding_type="rope"), V)
    assert not (tmp_path / "bad").exists()
