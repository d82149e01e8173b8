"""Batched sampling from a megatron GPT policy (TP-aware, KV-cached).

Prompts are token tensors [B, P]; ragged prompts are left-padded, with ``prompt_lengths`` [B]
giving each prompt's real length: padded positions are masked out of attention and positions
start at 0 at each prompt's first real token, so a padded prompt samples exactly as it would
alone. Sampling runs the same way on every tensor-parallel rank (full logits are gathered
with ``runtime_gather_output``) and the chosen tokens are broadcast from the first TP rank, so
all ranks agree exactly. With sequence parallel on, the KV-cached decode step (one token) cannot
be split over the sequence, so generation falls back to full forwards over a sequence padded to a
multiple of TP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    """0 = no top-k filter"""
    top_p: float = 1.0
    greedy: bool = False
    eos_id: Optional[int] = None
    pad_id: int = 0
    use_kv_cache: bool = True
    stop_strings: tuple = ()
    """Stop a sequence once its decoded completion contains one of these (needs ``decode``)."""


@dataclass
class GenerationOutput:
    tokens: torch.Tensor
    """[B, P + N] prompt then generated tokens; after EOS, pad_id"""
    logprobs: torch.Tensor
    """[B, N] log pi(token) under the temperature-1 distribution; 0 where mask is 0"""
    mask: torch.Tensor
    """[B, N] 1.0 for generated tokens up to and including EOS"""
    prompt_length: int

    @property
    def completions(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length:]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed entries become -inf. ``logits`` [B, V]."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _tp_broadcast(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    return t


def left_pad(prompts, pad_id: int):
    """Ragged lists of token ids -> (left-padded [B, P] tensor, lengths [B])."""
    lengths = torch.tensor([len(p) for p in prompts])
    out = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            out[i, out.shape[1] - len(p):] = torch.as_tensor(p)
    return out, lengths


def padded_attention(pad: torch.Tensor, total: int):
    """For left padding ``pad`` [B]: boolean mask [B, 1, total, total] (True = blocked: the
    future, and padded keys) and position ids [B, total] counted from each first real token."""
    idx = torch.arange(total, device=pad.device)
    causal = idx[None, :] > idx[:, None]                                # [S, S]
    pad_keys = idx[None, :] < pad[:, None]                              # [B, S]
    mask = causal[None, None] | pad_keys[:, None, None, :]
    # a fully masked row (a padded query) would give NaNs: let pads attend to themselves
    mask = mask & ~torch.eye(total, dtype=torch.bool, device=pad.device)[None, None]
    positions = (idx[None, :] - pad[:, None]).clamp(min=0)
    return mask, positions


@torch.no_grad()
def sample_step(logits: torch.Tensor, step: int, prompt_length: int, done: torch.Tensor, tokens: torch.Tensor,
                logprobs: torch.Tensor, mask: torch.Tensor, params: "SamplingParams", vocab_size: Optional[int],
                logits_processor, generator, decode) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decoding step shared by the GPT and T5 samplers: choose the next token from the full
    ``logits`` [b, V] (padded vocabulary masked, log-probs before any processor, greedy or
    filtered sampling, the TP source rank's choice everywhere), write it with its log-prob and mask
    at ``step`` (pad for finished rows), and return ``(choice, done)`` with EOS / stop strings applied."""
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
    tokens[:, prompt_length + step] = choice
    logprobs[:, step] = torch.where(done, torch.zeros_like(logprobs[:, step]),
                                    logp.gather(-1, choice[:, None]).squeeze(-1))
    mask[:, step] = (~done).float()
    if params.eos_id is not None:
        done = done | (choice == params.eos_id)
    if params.stop_strings:
        for i in range(tokens.shape[0]):
            if not done[i]:
                text = decode(tokens[i, prompt_length:prompt_length + step + 1].tolist())
                if any(stop in text for stop in params.stop_strings):
                    done[i] = True
    return choice, done


def generate(model: torch.nn.Module, prompts: torch.Tensor, params: SamplingParams,
             generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
             prompt_lengths: Optional[torch.Tensor] = None, decode=None,
             padding_side: str = "left", logits_processor=None) -> GenerationOutput:
    """Sample up to ``params.max_new_tokens`` tokens after ``prompts`` [B, P], padded on
    ``padding_side`` when ``prompt_lengths`` is given (right-padded prompts are re-aligned to the
    left-padded layout, which the returned ``tokens`` use).

    ``model`` is an unwrapped megatron GPTModel (pipeline_model_parallel_size must be 1);
    ``vocab_size`` masks the padded tail of the vocabulary (never sampled); ``decode`` (ids ->
    str) is needed for ``params.stop_strings``; ``logits_processor(logits [B, V]) -> logits`` runs
    right after each forward (e.g. ILQL's Q/V shift, which reads the heads of that forward)."""
    from megatron.core import parallel_state as ps

    from nemo_rlhf.models.t5 import is_t5

    if is_t5(model):  # encoder-decoder policies decode from the decoder (generation/seq2seq.py)
        from nemo_rlhf.generation.seq2seq import generate_seq2seq

        return generate_seq2seq(model, prompts, params, generator, vocab_size, prompt_lengths, decode,
                                padding_side, logits_processor)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    if padding_side == "right" and prompt_lengths is not None:
        # move each prompt's real tokens to the right end: generation continues from there
        shift = prompts.shape[1] - prompt_lengths.to(prompts.device)
        idx = (torch.arange(prompts.shape[1], device=prompts.device)[None, :] - shift[:, None]) % prompts.shape[1]
        prompts = prompts.gather(1, idx)
    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("generation needs pipeline_model_parallel_size=1: reshard the "
                                  "checkpoint to PP=1 for sampling")
    was_training = model.training
    model.eval()
    device = prompts.device
    b, p = prompts.shape
    n = params.max_new_tokens
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    sequence_parallel = getattr(model.config, "sequence_parallel", False)
    use_cache = params.use_kv_cache and not sequence_parallel
    tokens = torch.full((b, p + n), params.pad_id, dtype=torch.long, device=device)
    tokens[:, :p] = prompts
    logprobs = torch.zeros((b, n), device=device)
    mask = torch.zeros((b, n), device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)

    pad = None
    if prompt_lengths is not None:
        pad = (p - prompt_lengths.to(device)).clamp(min=0)
        if not bool((pad > 0).any()):
            pad = None
    if params.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")

    ctx = None
    if use_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=p + n)

    def next_logits(step: int) -> torch.Tensor:
        cur = p + step  # tokens known so far
        if ctx is not None:
            if step == 0:
                ids = tokens[:, :cur]
                pos = torch.arange(cur, device=device).expand(b, cur)
                mask = None
                if pad is not None:
                    mask, pos = padded_attention(pad, cur)
            else:
                ctx.enable_decode_mode()
                ids = tokens[:, cur - 1:cur]
                pos = torch.full((b, 1), cur - 1, device=device, dtype=torch.long)
                mask = None
                if pad is not None:
                    pos = pos - pad[:, None]
                    mask = (torch.arange(cur, device=device)[None, :] < pad[:, None])[:, None, None, :]
            out = model(ids, pos, mask, inference_context=ctx, runtime_gather_output=True)
            ctx.sequence_len_offset += ids.shape[1]
            return out[:, -1].float()
        length = cur if not sequence_parallel else ((cur + tp - 1) // tp) * tp
        ids = tokens[:, :length] if length <= tokens.shape[1] else torch.nn.functional.pad(
            tokens, (0, length - tokens.shape[1]), value=params.pad_id)
        pos = torch.arange(length, device=device).expand(b, length)
        mask = None
        if pad is not None:
            mask, pos = padded_attention(pad, length)
        out = model(ids, pos, mask, runtime_gather_output=True)
        return out[:, cur - 1].float()

    try:
        for step in range(n):
            logits = next_logits(step)
            choice, done = sample_step(logits, step, p, done, tokens, logprobs, mask, params, vocab_size,
                                       logits_processor, generator, decode)
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return GenerationOutput(tokens=tokens, logprobs=logprobs, mask=mask, prompt_length=p)
