"""megatron-core T5 (encoder-decoder) policies: builders, and the causal-LM view of a seq2seq model.

Builders mirror :mod:`nemo_rlhf.models.gpt`: one ``TransformerConfig`` for the decoder (depth
``model.num_layers``) and one for the encoder (``model.encoder_num_layers``), local or Transformer
Engine *layer* specs (``TransformerBlock`` then adds the final layernorm itself; megatron's
``get_t5_*_with_local_block_spec`` would ask for TENorm, which the local path does not have), and a
check that no final layernorm was dropped. PP=1 only (the config refuses PP>1 for arch=t5).

Every trainer in this package speaks the causal-LM layout of :mod:`nemo_rlhf.data`: ``tokens`` [N, S]
= prompt + completion (+ EOS) right-padded, ``labels`` [N, S] = tokens shifted left, and a mask that is
1 where ``labels`` is a completion token. :func:`split_causal_batch` turns that layout into T5's

    encoder  <- the prompt tokens (tokens[:, :P_i], P_i = 1 + first masked position of row i)
    decoder  <- [start] + completion   (start = pad, as Hugging Face T5's decoder_start_token_id)
    labels   <- completion + EOS

and :class:`CausalLayout` maps per-decoder-position outputs (NLL, values, Q heads) back to the
causal positions they stand for, so losses written for GPT apply to T5 unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from nemo_rlhf.config.schema import ConfigError, ModelConfig, ParallelConfig
from nemo_rlhf.models.gpt import padded_vocab_size, transformer_config, transformer_engine_available
from nemo_rlhf.models.heads import DecoderStates

DECODER_START_ID = 0
"""The decoder's first input token: pad, as Hugging Face T5's decoder_start_token_id (CharTokenizer's
pad id is 0 too). Training (:func:`t5_causal_forward`) and decoding (generation/seq2seq.py) share it."""


# -- builders ---------------------------------------------------------------------------------
def t5_transformer_configs(model: ModelConfig, parallel: ParallelConfig):
    """(decoder config, encoder config): the same settings, each with its own depth."""
    if parallel.pipeline_model_parallel_size > 1:
        raise ConfigError("model.arch=t5 needs parallel.pipeline_model_parallel_size=1")
    decoder = transformer_config(model, parallel)
    extra = {}
    if model.kv_channels is not None:
        extra["kv_channels"] = model.kv_channels
    if model.attention_softmax_scale is not None:
        extra["softmax_scale"] = model.attention_softmax_scale
    if extra:
        finalize = decoder.finalize_model_grads_func
        decoder = dataclasses.replace(decoder, **extra)
        decoder.finalize_model_grads_func = finalize
    encoder = dataclasses.replace(decoder, num_layers=model.encoder_num_layers or model.num_layers)
    encoder.finalize_model_grads_func = decoder.finalize_model_grads_func
    return decoder, encoder


def t5_layer_specs(model: ModelConfig):
    """(encoder layer spec, decoder layer spec): Transformer Engine when usable, local otherwise."""
    from megatron.core.models.T5 import t5_spec

    impl = model.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if transformer_engine_available() else "local"
    if impl == "transformer_engine":
        if not transformer_engine_available():
            raise ConfigError("model.transformer_impl=transformer_engine needs transformer_engine and CUDA; "
                              "use model.transformer_impl=local (or auto)")
        encoder = t5_spec.encoder_model_with_transformer_engine_default_spec()
        decoder = t5_spec.decoder_model_with_transformer_engine_default_spec()
    else:
        encoder, decoder = t5_spec.encoder_model_with_local_spec(), t5_spec.decoder_model_with_local_spec()
        if model.position_embedding_type == "relative":
            # megatron's local DotProductAttention asserts attention_bias is None (only TE's takes it)
            for spec in (encoder, decoder):
                spec.submodules.self_attention.submodules.core_attention = _biased_attention_class()
    decoder.submodules.cross_attention.module = _uncached_cross_attention_class()
    return encoder, decoder


_UNCACHED = None


def _uncached_cross_attention_class():
    """megatron's CrossAttention that never touches the inference context: its keys/values come from
    the fixed encoder states and are recomputed at each KV-cached decode step. (megatron's static
    KV cache is keyed by layer_number, which a decoder layer's self- and cross-attention share, and
    would append the encoder keys at every step.) Same parameters, same checkpoints."""
    global _UNCACHED
    if _UNCACHED is None:
        from megatron.core.transformer.attention import CrossAttention

        class CrossAttentionWithoutKVCache(CrossAttention):
            def forward(self, hidden_states, *args, inference_context=None, **kwargs):
                return super().forward(hidden_states, *args, inference_context=None, **kwargs)

        _UNCACHED = CrossAttentionWithoutKVCache
    return _UNCACHED


class _BiasedSoftmax(torch.nn.Module):
    """megatron's FusedScaleMaskSoftmax with an additive bias on the (already scaled) scores."""

    def __init__(self, softmax: torch.nn.Module):
        super().__init__()
        self.softmax = softmax
        self.bias: Optional[torch.Tensor] = None

    def forward(self, scores, mask, *args):
        if self.bias is not None:
            scores = scores + self.bias.to(scores.dtype)      # [b, np, sq, sk] + [1, np, sq, sk]
        return self.softmax(scores, mask, *args)


_BIASED = None


def _biased_attention_class():
    """megatron's local DotProductAttention that also takes ``attention_bias`` (T5's relative
    position bias, [1, heads / TP, sq, sk], added to q.k * scale before the mask and softmax, as
    Transformer Engine's core_attention_bias does). Built lazily: megatron imports are heavy."""
    global _BIASED
    if _BIASED is None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        class DotProductAttentionWithBias(DotProductAttention):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.scale_mask_softmax = _BiasedSoftmax(self.scale_mask_softmax)

            def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                        packed_seq_params=None):
                self.scale_mask_softmax.bias = attention_bias
                try:
                    return super().forward(query, key, value, attention_mask, attn_mask_type, None,
                                           packed_seq_params)
                finally:
                    self.scale_mask_softmax.bias = None

        _BIASED = DotProductAttentionWithBias
    return _BIASED


def build_t5_chunks(model: ModelConfig, parallel: ParallelConfig, vocab_size: int) -> List[torch.nn.Module]:
    """[T5Model] for this rank (PP=1: one chunk holding encoder, decoder and LM head)."""
    from megatron.core.models.T5 import T5Model

    if parallel.virtual_pipeline_model_parallel_size:
        raise ConfigError("model.arch=t5 does not support parallel.virtual_pipeline_model_parallel_size")
    vocab = getattr(model, "vocab_size", None) or vocab_size
    if vocab < vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but model.vocab_size={vocab}")
    decoder_config, encoder_config = t5_transformer_configs(model, parallel)
    encoder_spec, decoder_spec = t5_layer_specs(model)
    t5 = T5Model(
        config=decoder_config, encoder_config=encoder_config,
        transformer_encoder_layer_spec=encoder_spec, transformer_decoder_layer_spec=decoder_spec,
        vocab_size=padded_vocab_size(vocab, model), max_sequence_length=model.seq_length,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        relative_attention_num_buckets=model.relative_attention_num_buckets,
        relative_attention_max_distance=model.relative_attention_max_distance,
    )
    for name in ("encoder", "decoder"):
        if getattr(getattr(t5, name), "final_layernorm", None) is None:
            raise ConfigError(f"the T5 {name} was built without its final layernorm "
                              f"(layer spec {type(encoder_spec).__name__}); refusing to train a model that "
                              f"silently drops it")
    if decoder_config.params_dtype != torch.float32:
        t5.to(decoder_config.params_dtype)   # as megatron's Float16Module: every layer in one dtype
    if torch.cuda.is_available():
        t5.cuda(torch.cuda.current_device())
    return [t5]


def is_t5(model: torch.nn.Module) -> bool:
    """True for a (possibly DDP-wrapped) megatron T5Model."""
    from megatron.core.models.T5 import T5Model

    while not isinstance(model, T5Model) and hasattr(model, "module"):
        model = model.module
    return isinstance(model, T5Model)


def _unwrap_t5(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


# -- causal layout <-> encoder/decoder layout -------------------------------------------------------
@dataclass
class CausalLayout:
    """Where the decoder positions of a split batch sit in its causal layout.

    Decoder position j of row i predicts label ``labels[i, offset_i + j]`` with offset_i = P_i - 1."""

    offset: torch.Tensor  # [N] P_i - 1
    seq_length: int       # S of the causal layout

    def to_causal(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, Sd, ...] in decoder positions -> [N, S, ...]; positions before the completion are 0."""
        n, sd = x.shape[:2]
        t = torch.arange(self.seq_length, device=x.device)[None, :]           # [1, S]
        j = t - self.offset[:, None].to(x.device)                            # [N, S] decoder index
        valid = (j >= 0) & (j < sd)
        idx = j.clamp(0, sd - 1)
        idx = idx.view(n, self.seq_length, *([1] * (x.dim() - 2))).expand(n, self.seq_length, *x.shape[2:])
        out = x.gather(1, idx)
        return out * valid.view(n, self.seq_length, *([1] * (x.dim() - 2))).to(out.dtype)


@dataclass
class Seq2SeqBatch:
    """T5 inputs built from a causal batch (see the module docstring).

    enc_tokens [N, Se]  prompt tokens, right-padded (Se = longest prompt)
    enc_valid  [N, Se]  True on real prompt tokens
    dec_tokens [N, Sd]  start token then the completion (Sd = S - shortest prompt + 1)
    dec_labels [N, Sd]  completion + EOS (pad past the sequence)
    dec_mask   [N, Sd]  the causal mask moved to decoder positions
    """

    enc_tokens: torch.Tensor
    enc_valid: torch.Tensor
    dec_tokens: torch.Tensor
    dec_labels: torch.Tensor
    dec_mask: torch.Tensor
    layout: CausalLayout


def split_causal_batch(tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, pad_id: int = 0,
                       start_id: int = 0) -> Seq2SeqBatch:
    """Causal batch -> encoder/decoder inputs. ``mask`` [N, S] is 1 where labels[:, t] is a completion
    token: the prompt of row i is tokens[i, :P_i] with P_i - 1 the first such t (a row without any
    completion token is all prompt). Pure tensor indexing, no model."""
    if tokens.shape != labels.shape or tokens.shape != mask.shape or tokens.dim() != 2:
        raise ValueError(f"tokens, labels and mask must be [N, S] alike, got {tuple(tokens.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(mask.shape)}")
    n, s = tokens.shape
    device = tokens.device
    has = mask.bool().any(1)
    first = mask.bool().float().argmax(1)                                     # first completion label
    prompt_len = torch.where(has, first + 1, torch.full_like(first, s))      # [N] P_i
    se = int(prompt_len.max())
    pos = torch.arange(max(se, s), device=device)
    enc_valid = pos[None, :se] < prompt_len[:, None]
    enc_tokens = torch.where(enc_valid, tokens[:, :se], torch.full_like(tokens[:, :se], pad_id))

    offset = prompt_len - 1
    sd = s - int(offset.min())
    t = offset[:, None] + pos[None, :sd]                                     # [N, Sd] label index
    inside = t < s
    tc = t.clamp(max=s - 1)
    dec_labels = torch.where(inside, labels.gather(1, tc), torch.full_like(tc, pad_id))
    dec_mask = torch.where(inside, mask.gather(1, tc), torch.zeros_like(mask[:, :1]).expand(n, sd))
    start = torch.full((n, 1), start_id, dtype=tokens.dtype, device=device)
    dec_tokens = torch.cat([start, dec_labels[:, :-1]], 1)
    return Seq2SeqBatch(enc_tokens, enc_valid, dec_tokens, dec_labels, dec_mask, CausalLayout(offset, s))


def attention_masks(enc_valid: torch.Tensor, dec_len: int):
    """megatron boolean masks (True = blocked): encoder self-attention [N, 1, Se, Se] and
    decoder-to-encoder cross-attention [N, 1, Sd, Se], both blocking padded prompt keys. The decoder
    self-attention mask is megatron's causal default (its padding is on the right)."""
    blocked = ~enc_valid[:, None, None, :]                                   # [N, 1, 1, Se]
    se = enc_valid.shape[1]
    return blocked.expand(-1, 1, se, se), blocked.expand(-1, 1, dec_len, se)


def t5_decode(t5: torch.nn.Module, decoder_input_ids: torch.Tensor, encoder_states: torch.Tensor,
              decoder_attn_mask: Optional[torch.Tensor], encoder_decoder_attn_mask: Optional[torch.Tensor],
              lm_labels: Optional[torch.Tensor] = None):
    """The decoder half of ``T5Model.forward`` on given encoder states, also returning the decoder's
    output: ``(output, hidden)``. ``output`` is what ``t5(..., encoder_hidden_states=encoder_states)``
    returns (per-token NLL [N, Sd] with ``lm_labels``, else vocab-parallel logits [N, Sd, V/tp]);
    ``hidden`` [Sd, N, H] is the decoder block's output after its final layernorm, for the heads.

    T5Model.forward has no stage split to call (GPT's is used in models/gpt.py), and returns the
    decoder states only without an output layer, so this repeats its decoder half -- embedding at
    positions 0..Sd-1, rotary table or relative-position bias (heads scattered over TP), decoder
    block, LM head, loss -- op for op: tests/unit/test_t5.py pins it against megatron's own call."""
    from megatron.core.models.common.embeddings.relative_pos_embedding import RelativePositionEmbedding
    from megatron.core.models.T5.t5_model import t5_position_ids
    from megatron.core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region

    decoder_input = None                       # intermediate pipeline stage (PP is refused for T5)
    if t5.pre_process:
        decoder_input = t5.embedding(input_ids=decoder_input_ids, position_ids=t5_position_ids(decoder_input_ids))
    rotary_pos_emb, bias = None, None
    if t5.position_embedding_type == "rope":
        rotary_pos_emb = t5.rotary_pos_emb(
            t5.rotary_pos_emb.get_rotary_seq_len(None, t5.decoder, decoder_input, t5.config, None))
    elif t5.position_embedding_type == "relative":
        length = RelativePositionEmbedding.get_relative_seq_len(None, t5.decoder, decoder_input, t5.config)
        full = t5.decoder_relative_pos_emb(length, length)                       # [1, heads, Sd, Sd]
        bias = scatter_to_tensor_model_parallel_region(full.permute(0, 2, 3, 1), t5.tp_group).permute(0, 3, 1, 2)
    hidden = t5.decoder(hidden_states=decoder_input, attention_mask=decoder_attn_mask, context=encoder_states,
                        context_mask=encoder_decoder_attn_mask, rotary_pos_emb=rotary_pos_emb, attention_bias=bias)
    if not t5.post_process:
        return hidden, hidden
    weight = t5.shared_embedding_or_output_weight() if t5.share_embeddings_and_output_weights else None
    logits = t5.lm_head(hidden, word_embeddings_weight=weight)                   # [Sd, N, V/tp]
    if lm_labels is None:
        return logits.transpose(0, 1).contiguous(), hidden
    return t5.compute_language_model_loss(lm_labels, logits), hidden


def t5_causal_forward(model: torch.nn.Module, tokens: torch.Tensor, labels: Optional[torch.Tensor],
                      mask: torch.Tensor, pad_id: int = DECODER_START_ID) -> Tuple[Optional[torch.Tensor], DecoderStates]:
    """Run a T5 policy on a causal batch. Returns ``(nll, states)``: the per-token NLL [N, S] in the
    causal layout (0 at prompt positions) when ``labels`` is given, else None; and the decoder's
    hidden states with the batch's :class:`CausalLayout`, for the value/ILQL heads."""
    t5 = _unwrap_t5(model)
    lab = labels if labels is not None else torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
    batch = split_causal_batch(tokens, lab, mask, pad_id=pad_id, start_id=DECODER_START_ID)
    enc_mask, cross_mask = attention_masks(batch.enc_valid, batch.dec_tokens.shape[1])
    encoder_states = t5(batch.enc_tokens, None, enc_mask, None, None, output_encoder_hidden_only=True)
    out, hidden = t5_decode(t5, batch.dec_tokens, encoder_states, None, cross_mask,
                            lm_labels=batch.dec_labels if labels is not None else None)
    states = DecoderStates(hidden, batch.layout)
    return (batch.layout.to_causal(out) if labels is not None else None), states
