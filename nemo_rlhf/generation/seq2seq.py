"""Sampling from a megatron T5 (encoder-decoder) policy, returning what :func:`generation.sampling.generate`
returns for GPT, so evaluation and the trainers use either unchanged.

The prompt goes to the encoder once; its hidden states are reused at every step (passed back as
``encoder_hidden_states``). The decoder starts from ``DECODER_START_ID`` and is re-run over the
tokens generated so far at each step: the encoder is cached, the decoder is not. megatron-core
0.16's static KV cache (``StaticInferenceContext``, used for GPT in generation/sampling.py) keys its
buffers by ``layer_number`` alone, and a T5 decoder layer's self- and cross-attention share that
number (as do encoder layers), so their caches would overwrite each other; the cross-attention
keys would be appended at each step instead of kept; and ``T5Model.forward`` derives decoder
positions (learned or relative bias) from the length of the tokens it is given, so a one-token
decode step would sit at position 0. Greedy and sampled
decoding are exact; the cost is O(N^2) decoder positions for N new tokens instead of O(N), small for
the short completions of the tiny tasks.

Ragged prompts: ``prompt_lengths`` [B] with left (default) or right padding; the encoder sees each
prompt right-padded with its padding masked out of attention (T5 positions count from the first
token), and the returned ``tokens`` use the left-padded layout, as for GPT.
"""
from __future__ import annotations

from typing import Optional

import torch

from nemo_rlhf.generation.sampling import GenerationOutput, SamplingParams, _tp_broadcast, filter_logits
from nemo_rlhf.models.t5 import DECODER_START_ID, attention_masks


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[B, S, V/tp] vocab-parallel logits -> full [B, S, V] on every TP rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        return gather_from_tensor_model_parallel_region(logits)
    return logits


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
    model.causal_layout = None  # heads read decoder positions as they are during decoding
    try:
        enc_mask, _ = attention_masks(enc_valid, 1)
        encoder_states = model(enc_tokens, None, enc_mask, None, None, output_encoder_hidden_only=True)
        for step in range(n):
            _, cross_mask = attention_masks(enc_valid, step + 1)
            logits = model(enc_tokens, dec[:, :step + 1], enc_mask, None, cross_mask,
                           encoder_hidden_states=encoder_states)
            logits = _gather_vocab(logits)[:, -1].float()
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1)
            if logits_processor is not None:
                logits = logits_processor(logits)
            if params.greedy:
                choice = logits.argmax(-1)
            else:
                scores = filter_logits(logits / params.temperature, params.top_k, params.top_p)
                choice = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)
            choice = _tp_broadcast(choice.contiguous())
            choice = torch.where(done, torch.full_like(choice, params.pad_id), choice)
            tokens[:, p + step] = choice
            dec[:, step + 1] = choice
            logprobs[:, step] = torch.where(done, torch.zeros_like(logprobs[:, step]),
                                            logp.gather(-1, choice[:, None]).squeeze(-1))
            mask[:, step] = (~done).float()
            if params.eos_id is not None:
                done = done | (choice == params.eos_id)
            if params.stop_strings:
                for i in range(b):
                    if not done[i]:
                        text = decode(tokens[i, p:p + step + 1].tolist())
                        if any(stop in text for stop in params.stop_strings):
                            done[i] = True
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return GenerationOutput(tokens=tokens, logprobs=logprobs, mask=mask, prompt_length=p)
