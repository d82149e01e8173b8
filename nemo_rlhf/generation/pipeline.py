"""Decoding and forward-only passes across pipeline stages (PP > 1, no virtual stages).

One forward of the sampler runs the stages in order: the first embeds the tokens, each stage runs
its layers (with its own KV cache) and sends its hidden states [S, B, H] to the next, and the last
one computes the logits. The last stage chooses the next token; the step's token, log-prob, mask
and finished flags are then broadcast to every stage of the pipeline, so every rank holds the same
sequences (the reward function and the experience pass read them on all ranks). A forward-only
pass outside megatron's schedule (the experience pass of the online-RL loop) goes the same way and
the last stage's result is broadcast with :func:`from_last_stage`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from nemo_rlhf.models.gpt import gpt_forward


def pipeline_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def check_pipeline_layout() -> None:
    from megatron.core import parallel_state as ps

    if pipeline_size() > 1 and (ps.get_virtual_pipeline_model_parallel_world_size() or 1) > 1:
        raise NotImplementedError("generation at parallel.virtual_pipeline_model_parallel_size > 1 is not "
                                  "supported: reshard the checkpoint to a layout without virtual stages")


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return pipeline_size() == 1 or ps.is_pipeline_last_stage(ignore_virtual=True)


def stage_forward(model, ids: torch.Tensor, pos: torch.Tensor, mask: Optional[torch.Tensor],
                  inference_context=None, labels: Optional[torch.Tensor] = None
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(logits [B, S, V] -- or the per-token NLL [B, S] of ``labels`` --, final hidden [S, B, H]) on
    the last stage; (None, None) on the others, after they ran their layers and passed the hidden
    states on."""
    if pipeline_size() == 1:
        return gpt_forward(model, ids, pos, mask, labels=labels, inference_context=inference_context,
                           runtime_gather_output=True)
    from megatron.core import parallel_state as ps

    config = model.config
    b, s = ids.shape
    if not ps.is_pipeline_first_stage(ignore_virtual=True):
        tp = ps.get_tensor_model_parallel_world_size()
        rows = s // tp if config.sequence_parallel else s
        dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
        received = torch.empty((rows, b, config.hidden_size), dtype=dtype, device=ids.device)
        dist.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    out, hidden = gpt_forward(model, ids, pos, mask, labels=labels, inference_context=inference_context,
                              runtime_gather_output=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None, None
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
