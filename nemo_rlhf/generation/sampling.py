"""Batched sampling from a megatron GPT policy (TP-aware, KV-cached).

Prompts are token tensors [B, P]; ragged prompts are left-padded, with ``prompt_lengths`` [B]
giving each prompt's real length: padded positions are masked out of attention and positions
start at 0 at each prompt's first real token, so a padded prompt samples exactly as it would
alone. Sampling runs the same way on every tensor-parallel rank (full logits are gathered
with ``runtime_gather_output``) and the chosen tokens are broadcast from the first TP rank, so
all ranks agree exactly. With sequence parallel on, the KV-cached decode step (one token) cannot
be split over the sequence, so generation falls back to full forwards over a sequence padded to a
multiple of TP. What the GPT and T5 samplers share (parameters, output, one decoding step) is in
generation/decoding.py; T5 policies are dispatched to generation/seq2seq.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from nemo_rlhf.generation.decoding import (  # noqa: F401  (SamplingParams, GenerationOutput, filter_logits re-exported)
    GenerationOutput, SamplingParams, filter_logits, sample_step,
)
from nemo_rlhf.generation import fast_decode
from nemo_rlhf.generation.seq2seq import generate_seq2seq
from nemo_rlhf.generation.pipeline import Chunks, as_chunks, is_last_stage, pipeline_size, share_step, stage_forward
from nemo_rlhf.models.t5 import is_t5


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


def generate(model: Chunks, prompts: torch.Tensor, params: SamplingParams,
             generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
             prompt_lengths: Optional[torch.Tensor] = None, decode=None,
             padding_side: str = "left", logits_processor=None) -> GenerationOutput:
    """Sample up to ``params.max_new_tokens`` tokens after ``prompts`` [B, P], padded on
    ``padding_side`` when ``prompt_lengths`` is given (right-padded prompts are re-aligned to the
    left-padded layout, which the returned ``tokens`` use).

    ``model`` is an unwrapped megatron GPTModel, or this rank's pipeline stage of one, or with virtual
    pipeline stages this rank's chunks in order (the stages pass hidden states on,
    generation/pipeline.py);
    ``vocab_size`` masks the padded tail of the vocabulary (never sampled); ``decode`` (ids ->
    str) is needed for ``params.stop_strings``; ``logits_processor(logits [B, V], hidden [S, B, H])
    -> logits`` runs right after each forward, with that forward's final hidden states (e.g. ILQL's
    Q/V shift, which runs its heads on them)."""
    from megatron.core import parallel_state as ps

    chunks = as_chunks(model)
    model = chunks[0]
    if is_t5(model):  # encoder-decoder policies decode from the decoder (generation/seq2seq.py)
        return generate_seq2seq(model, prompts, params, generator, vocab_size, prompt_lengths, decode,
                                padding_side, logits_processor)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    if padding_side == "right" and prompt_lengths is not None:
        # move each prompt's real tokens to the right end: generation continues from there
        shift = prompts.shape[1] - prompt_lengths.to(prompts.device)
        idx = (torch.arange(prompts.shape[1], device=prompts.device)[None, :] - shift[:, None]) % prompts.shape[1]
        prompts = prompts.gather(1, idx)
    last_stage, pipelined = is_last_stage(), pipeline_size() > 1
    was_training = model.training
    for chunk in chunks:
        chunk.eval()
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

    ctx = fast = active = None   # active: the rows the lean decoder still computes (None: all)
    if use_cache and params.fast_decode and not pipelined and fast_decode.supported(model):
        fast = fast_decode.FastDecoder(model, b, p + n, device, model.embedding.word_embeddings.weight.dtype)
    elif use_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=p + n)

    def next_logits(step: int):
        """(logits [B, V] for the next token, the forward's hidden states [S', B, H])"""
        cur = p + step  # tokens known so far
        if ctx is not None or fast is not None:
            if step == 0:
                ids = tokens[:, :cur]
                pos = torch.arange(cur, device=device).expand(b, cur)
                mask = None
                if pad is not None:
                    mask, pos = padded_attention(pad, cur)
            else:
                if ctx is not None:
                    ctx.enable_decode_mode()
                rows = slice(None) if active is None else active
                ids = tokens[rows, cur - 1:cur]
                pos = torch.full((ids.shape[0], 1), cur - 1, device=device, dtype=torch.long)
                mask = None
                if pad is not None:
                    pos = pos - pad[rows, None]
                    mask = (torch.arange(cur, device=device)[None, :] < pad[rows, None])[:, None, None, :]
            if fast is not None:
                out, hidden = fast.forward(ids, pos, mask)
                if active is not None:   # finished rows were dropped: theirs are never read
                    out = out.new_zeros((b,) + out.shape[1:]).index_copy_(0, active, out)
                    if logits_processor is not None:
                        hidden = hidden.new_zeros((hidden.shape[0], b, hidden.shape[2])).index_copy_(1, active, hidden)
            else:
                out, hidden = stage_forward(chunks, ids, pos, mask, inference_context=ctx)
                ctx.sequence_len_offset += ids.shape[1]
            return (None if out is None else out[:, -1].float()), hidden
        length = cur if not sequence_parallel else ((cur + tp - 1) // tp) * tp
        ids = tokens[:, :length] if length <= tokens.shape[1] else torch.nn.functional.pad(
            tokens, (0, length - tokens.shape[1]), value=params.pad_id)
        pos = torch.arange(length, device=device).expand(b, length)
        mask = None
        if pad is not None:
            mask, pos = padded_attention(pad, length)
        out, hidden = stage_forward(chunks, ids, pos, mask)
        return (None if out is None else out[:, cur - 1].float()), hidden

    try:
        # the lean decoder runs in inference mode (no autograd bookkeeping per op: ~10% of a small
        # model's decoding time on a CPU); the outputs were made before it, so they stay ordinary
        # tensors that training can use. Not megatron's path: its modules keep buffers across calls
        # (the sequence-parallel all-gather buffer, ...) that training would then fail to write.
        with torch.inference_mode() if fast is not None else torch.no_grad():
            for step in range(n):
                logits, hidden = next_logits(step)
                if last_stage:   # (with PP > 1, the last stage chooses and the others get its choice)
                    _, done = sample_step(logits, step, p, done, tokens, logprobs, mask, params, vocab_size,
                                          logits_processor, generator, decode, hidden=hidden)
                if pipelined:
                    done = share_step(step, p, tokens, logprobs, mask, done)
                if bool(done.all()):
                    break
                if fast is not None:
                    active = _drop_finished(fast, active, done)
    finally:
        for chunk in chunks:
            chunk.train(was_training)
    return GenerationOutput(tokens=tokens, logprobs=logprobs, mask=mask, prompt_length=p)


def _drop_finished(fast, active: Optional[torch.Tensor], done: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows that finished stop costing compute: once a quarter of the rows the lean decoder computes
    have finished, its cache keeps only the others (a copy of the cache, so not at every step).
    Returns the rows it computes from now on (indices into the batch)."""
    left = (~done).nonzero().squeeze(1)
    computed = done.shape[0] if active is None else active.shape[0]
    if left.shape[0] > computed * 3 // 4:
        return active
    fast.keep_rows(left if active is None else torch.searchsorted(active, left))
    return left
