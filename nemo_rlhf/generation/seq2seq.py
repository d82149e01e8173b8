"""Sampling from a megatron T5 (encoder-decoder) policy, returning what :func:`generation.sampling.generate`
returns for GPT, so evaluation and the trainers use either unchanged.

The prompt goes to the encoder once; its hidden states are reused at every step. The decoder starts
from ``DECODER_START_ID`` and, with ``params.use_kv_cache`` (the default), runs one token per step
with megatron's ``StaticInferenceContext`` caching its self-attention keys/values. Three things in
megatron-core 0.16 stand in the way of simply passing that context to ``T5Model.forward``, handled
here: the cache is keyed by ``layer_number``, which a decoder layer's self- and cross-attention
share, and it would append the encoder keys at every step -- so cross-attention is built without
the cache (models/t5.py; it re-projects the short encoder states each step); and ``T5Model.forward``
numbers decoder positions from 0 for whatever tokens it is given -- so the step calls the embedding
(explicit position), the decoder block (the relative-bias row of that position) and the LM head
itself. ``use_kv_cache=False`` re-runs the whole decoder prefix each step (the reference the cached
path is tested against: same tokens, log-probs within 1e-6).

Ragged prompts: ``prompt_lengths`` [B] with left (default) or right padding; the encoder sees each
prompt right-padded with its padding masked out of attention (T5 positions count from the first
token), and the returned ``tokens`` use the left-padded layout, as for GPT.
"""
from __future__ import annotations

from typing import Optional

import torch

from nemo_rlhf.generation.decoding import GenerationOutput, SamplingParams, sample_step
from nemo_rlhf.models.t5 import DECODER_START_ID, attention_masks, t5_decode


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[B, S, V/tp] vocab-parallel logits -> full [B, S, V] on every TP rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        return gather_from_tensor_model_parallel_region(logits)
    return logits


def _cached_decoder_step(t5, token: torch.Tensor, pos: int, ctx, encoder_states, cross_mask) -> torch.Tensor:
    """The decoder on one token per sequence (``token`` [B], at decoder position ``pos``) with
    megatron's static KV cache for self-attention; cross-attention re-projects the encoder states
    (see models/t5.py). Positions are given explicitly (T5Model.forward would count from 0).
    Returns (vocab-parallel logits [B, 1, V/tp], the decoder's hidden states [1, B, H])."""
    from megatron.core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region

    b = token.shape[0]
    positions = torch.full((b, 1), pos, dtype=torch.long, device=token.device)
    hidden = t5.embedding(input_ids=token[:, None], position_ids=positions)      # [1, B, H]
    bias, rotary = None, None
    if t5.position_embedding_type == "relative":
        # row ``pos`` of the decoder's [1, heads, q, k] bias, keys 0..pos; heads scattered over TP
        full = t5.decoder_relative_pos_emb(pos + 1, pos + 1)[:, :, -1:, :]
        bias = scatter_to_tensor_model_parallel_region(full.permute(0, 2, 3, 1), t5.tp_group).permute(0, 3, 1, 2)
    elif t5.position_embedding_type == "rope":
        rotary = t5.rotary_pos_emb(ctx.max_sequence_length)
    hidden = t5.decoder(hidden_states=hidden, attention_mask=None, context=encoder_states, context_mask=cross_mask,
                        inference_context=ctx, rotary_pos_emb=rotary, attention_bias=bias)
    weight = t5.shared_embedding_or_output_weight() if t5.share_embeddings_and_output_weights else None
    return t5.lm_head(hidden, word_embeddings_weight=weight).transpose(0, 1), hidden


@torch.no_grad()
def generate_seq2seq(model: torch.nn.Module, prompts: torch.Tensor, params: SamplingParams,
                     generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
                     prompt_lengths: Optional[torch.Tensor] = None, decode=None,
                     padding_side: str = "left", logits_processor=None) -> GenerationOutput:
    """Sample up to ``params.max_new_tokens`` decoder tokens for the prompts [B, P] (arguments as
    :func:`nemo_rlhf.generation.sampling.generate`). ``model`` is an unwrapped megatron T5Model."""
    from megatron.core import parallel_state as ps

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("T5 generation needs pipeline_model_parallel_size=1")
    if params.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    device = prompts.device
    b, p = prompts.shape
    n = params.max_new_tokens
    if model.position_embedding_type == "learned_absolute" and max(p, n + 1) > model.max_sequence_length:
        raise ValueError(f"T5 with learned positions holds {model.max_sequence_length} positions "
                         f"(model.seq_length): prompts of {p} tokens / max_new_tokens={n} (+ the start "
                         f"token) do not fit")
    lengths = torch.full((b,), p, device=device) if prompt_lengths is None else prompt_lengths.to(device)
    idx = torch.arange(p, device=device)
    pad = p - lengths                                                         # [B] padding per prompt
    if padding_side == "left":
        # encoder input: each prompt's real tokens first (right-padded)
        enc_tokens = prompts.gather(1, (idx[None, :] + pad[:, None]) % p)
        left = prompts
    else:
        enc_tokens = prompts
        left = prompts.gather(1, (idx[None, :] - pad[:, None]) % p)
    enc_valid = idx[None, :] < lengths[:, None]
    enc_tokens = torch.where(enc_valid, enc_tokens, torch.full_like(enc_tokens, params.pad_id))
    if padding_side == "left":
        left = torch.where(idx[None, :] >= pad[:, None], left, torch.full_like(left, params.pad_id))

    tokens = torch.full((b, p + n), params.pad_id, dtype=torch.long, device=device)
    tokens[:, :p] = left
    logprobs = torch.zeros((b, n), device=device)
    mask = torch.zeros((b, n), device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    dec = torch.full((b, n + 1), DECODER_START_ID, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    ctx = None
    if params.use_kv_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=n + 1)
    try:
        enc_mask, _ = attention_masks(enc_valid, 1)
        encoder_states = model(enc_tokens, None, enc_mask, None, None, output_encoder_hidden_only=True)
        for step in range(n):
            if ctx is not None:
                _, cross_mask = attention_masks(enc_valid, 1)
                if step > 0:
                    ctx.enable_decode_mode()
                logits, hidden = _cached_decoder_step(model, dec[:, step], step, ctx, encoder_states, cross_mask)
                ctx.sequence_len_offset += 1
            else:
                _, cross_mask = attention_masks(enc_valid, step + 1)
                logits, hidden = t5_decode(model, dec[:, :step + 1], encoder_states, None, cross_mask)
            logits = _gather_vocab(logits)[:, -1].float()
            choice, done = sample_step(logits, step, p, done, tokens, logprobs, mask, params, vocab_size,
                                       logits_processor, generator, decode, hidden=hidden)
            dec[:, step + 1] = choice
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return GenerationOutput(tokens=tokens, logprobs=logprobs, mask=mask, prompt_length=p)
