"""Forward-only passes of a causal LM (with an optional head) whose results every rank needs: the
experience pass of the online-RL loop (policy and reference log-probs, values), reward-model
scoring and evaluation.

With pipeline stages the rows go through megatron's forward-only pipeline schedule in
micro-batches, so the stages overlap (while the last stage computes micro-batch i, the first one
computes i + PP - 1; with virtual stages the interleaved schedule), and the last stage's per-token
results are broadcast to the other stages. Without pipeline stages it is one forward.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from nemo_rlhf.generation.pipeline import as_chunks, from_last_stage, pipeline_size, stage_forward
from nemo_rlhf.generation.sampling import padded_attention
from nemo_rlhf.models.gpt import gpt_forward, unwrap
from nemo_rlhf.models.heads import DecoderStates

Head = Callable[[torch.nn.Module, DecoderStates], torch.Tensor]


def gpt_layout(tokens: torch.Tensor, pad: Optional[torch.Tensor], segments: Optional[torch.Tensor] = None):
    """(attention mask, position ids) of GPT rows that start with ``pad`` left-padding tokens
    (None: no padding, causal mask only, positions 0..S-1), or of packed rows: ``segments`` [B, S]
    numbers the example of each position (data/sft.py ``SFTDataset.packed``); a position attends
    causally within its example only and positions restart at 0 with each example."""
    if segments is not None:
        return packed_attention(segments.to(tokens.device))
    if pad is None:
        return None, torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return padded_attention(pad.to(tokens.device), tokens.shape[1])


def packed_attention(segments: torch.Tensor):
    """(mask [B, 1, S, S], True = blocked: the future and other examples; position ids [B, S]).
    Padding (segment 0) gets position 0: a packed row can be wider than the model's position table
    (up to twice the longest span), and nothing reads the padding's outputs."""
    s = segments.shape[1]
    idx = torch.arange(s, device=segments.device)
    mask = (segments[:, :, None] != segments[:, None, :]) | (idx[None, :] > idx[:, None])[None]
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx[None, :], torch.zeros_like(segments)).cummax(dim=1).values
    return mask[:, None], torch.where(segments > 0, idx[None, :] - first, torch.zeros_like(first))


def lm_across_stages(model, tokens: torch.Tensor, labels: Optional[torch.Tensor], pad: Optional[torch.Tensor] = None,
                     head: Optional[Head] = None, micro_batch_size: Optional[int] = None
                     ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(per-token NLL [B, S] of ``labels`` or None without labels, ``head(chunk, states)`` [B, S] or
    None without a head) on every rank, in fp32. GPT only. ``model``: a GPTModel, or this rank's
    chunks (``MegatronEngine.stages``; heads sit on the last one). ``pad`` [B]: left padding per row
    (masked out of attention, positions counted from each row's first real token).

    At PP > 1 the rows run through megatron's forward-only schedule in micro-batches of
    ``micro_batch_size`` rows (default: B / PP, rounded up); with virtual stages the number of
    micro-batches is rounded up to a multiple of PP (the interleaved schedule's groups) with copies
    of the last row, whose results are dropped."""
    if pad is not None and not bool((pad > 0).any()):
        pad = None
    chunks = [unwrap(c) for c in as_chunks(model)]
    if pipeline_size() == 1:
        attention_mask, position_ids = gpt_layout(tokens, pad)
        out, hidden = stage_forward(chunks, tokens, position_ids, attention_mask, labels=labels)
        return (None if labels is None else out.float(),
                None if head is None else head(chunks[-1], DecoderStates(hidden)).float())
    kinds = int(labels is not None) + int(head is not None)
    rows = _scheduled(chunks, tokens, labels, pad, head, micro_batch_size)
    shared = iter(from_last_stage(rows, (kinds, *tokens.shape), device=tokens.device))
    return (next(shared) if labels is not None else None), (next(shared) if head is not None else None)


def _micro_batches(tokens, labels, pad, micro_batch_size: Optional[int], pp: int, interleaved: bool
                   ) -> Tuple[List[Dict[str, torch.Tensor]], int]:
    b = tokens.shape[0]
    mbs = max(1, min(micro_batch_size or math.ceil(b / pp), b))
    num = math.ceil(b / mbs)
    if interleaved:
        num = math.ceil(num / pp) * pp
    fill = num * mbs - b
    batch = {"tokens": tokens}
    if labels is not None:
        batch["labels"] = labels
    if pad is not None:
        batch["pad"] = pad.to(tokens.device)
    if fill:
        batch = {k: torch.cat([v, v[-1:].expand(fill, *v.shape[1:])]) for k, v in batch.items()}
    return [{k: v[i * mbs:(i + 1) * mbs] for k, v in batch.items()} for i in range(num)], mbs


def _scheduled(chunks: List[torch.nn.Module], tokens, labels, pad, head: Optional[Head],
               micro_batch_size: Optional[int]) -> Optional[torch.Tensor]:
    """[kinds, B, S] (NLL, head values) on the last pipeline stage, None on the others."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    micro, mbs = _micro_batches(tokens, labels, pad, micro_batch_size,
                                ps.get_pipeline_model_parallel_world_size(), len(chunks) > 1)

    def step(data_iterator, model):
        mb = next(data_iterator)
        gpt = unwrap(model)
        attention_mask, position_ids = gpt_layout(mb["tokens"], mb.get("pad"))
        out, hidden = gpt_forward(gpt, mb["tokens"], position_ids, attention_mask, labels=mb.get("labels"),
                                  runtime_gather_output=True)
        if not gpt.post_process:
            return out, None      # hidden states for the next stage (the schedule sends them)
        parts = [] if labels is None else [out.float()]
        if head is not None:
            parts.append(head(gpt, DecoderStates(hidden)).float())
        return torch.stack(parts), lambda rows: (rows.new_zeros(()), {"rows": rows})

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro), seq_length=s, micro_batch_size=mbs, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["rows"] for o in outputs], dim=1)[:, :b]
