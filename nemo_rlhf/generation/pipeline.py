"""Decoding across pipeline stages (PP > 1, with or without virtual stages).

One forward of the sampler runs the stages in order: the first embeds the tokens, each stage runs
its layers (with its own KV cache) and sends its hidden states [S, B, H] to the next, and the last
one computes the logits. With virtual stages (interleaving) a rank holds several model chunks and
the order goes round the ring V times: chunk 0 of ranks 0..P-1, then chunk 1 of ranks 0..P-1, ...;
the last rank's chunk v sends to the first rank's chunk v + 1 (megatron's ring neighbours). The
last stage chooses the next token; the step's token, log-prob, mask and finished flags are then
broadcast to every stage of the pipeline, so every rank holds the same sequences (the reward
function and the experience pass read them on all ranks). Forward-only passes over whole batches
(the experience pass, reward scoring) go through megatron's forward-only schedule instead
(modules/forward_only.py) and share their results with :func:`from_last_stage`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from nemo_rlhf.models.gpt import gpt_forward


def pipeline_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


Chunks = Union[torch.nn.Module, Sequence[torch.nn.Module]]
"""A model as the sampler takes it: the (unwrapped) GPTModel, or this rank's pipeline stage of one,
or -- with virtual pipeline stages -- this rank's chunks in order (``MegatronEngine.stages``)."""


def as_chunks(model: Chunks) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return pipeline_size() == 1 or ps.is_pipeline_last_stage(ignore_virtual=True)


def stage_forward(model: Chunks, ids: torch.Tensor, pos: torch.Tensor, mask: Optional[torch.Tensor],
                  inference_context=None, labels: Optional[torch.Tensor] = None
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(logits [B, S, V] -- or the per-token NLL [B, S] of ``labels`` --, final hidden [S, B, H]) on
    the last stage; (None, None) on the others, after they ran their layers (each of their chunks in
    turn) and passed the hidden states on. One inference context serves all chunks of a rank: its KV
    cache is keyed by the global layer number."""
    chunks = as_chunks(model)
    if pipeline_size() == 1:
        return gpt_forward(chunks[0], ids, pos, mask, labels=labels, inference_context=inference_context,
                           runtime_gather_output=True)
    from megatron.core import parallel_state as ps

    out = hidden = None
    for chunk in chunks:
        if not chunk.pre_process:
            config = chunk.config
            b, s = ids.shape
            tp = ps.get_tensor_model_parallel_world_size()
            rows = s // tp if config.sequence_parallel else s
            dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
            received = torch.empty((rows, b, config.hidden_size), dtype=dtype, device=ids.device)
            dist.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(received)
        out, hidden = gpt_forward(chunk, ids, pos, mask, labels=labels, inference_context=inference_context,
                                  runtime_gather_output=True)
        if not chunk.post_process:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = hidden = None
    return out, hidden


def share_step(step: int, prompt_length: int, tokens: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor,
               done: torch.Tensor) -> torch.Tensor:
    """The last stage's step ``step`` (its token, log-prob, mask and the finished flags, in one
    broadcast) on every stage of the pipeline; returns ``done``."""
    from megatron.core import parallel_state as ps

    column = prompt_length + step
    # float64 holds token ids exactly (< 2^53)
    shared = torch.stack([tokens[:, column].double(), logprobs[:, step].double(), mask[:, step].double(),
                          done.double()])
    dist.broadcast(shared, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    tokens[:, column] = shared[0].to(tokens.dtype)
    logprobs[:, step] = shared[1].to(logprobs.dtype)
    mask[:, step] = shared[2].to(mask.dtype)
    return shared[3].bool()


def from_last_stage(value: Optional[torch.Tensor], shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """The last pipeline stage's ``value`` (``shape``, ``dtype``) on every stage of the pipeline."""
    if pipeline_size() == 1:
        return value
    from megatron.core import parallel_state as ps

    buf = value.to(dtype).contiguous() if value is not None else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return buf
