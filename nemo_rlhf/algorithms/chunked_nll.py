"""Per-token negative log-likelihood of the output layer, a chunk of tokens at a time.

The usual causal-LM loss builds logits ``hidden @ W.T`` for every token and the whole (vocabulary-
parallel) vocabulary, in fp32, and autograd keeps them (or their softmax) for the backward: 4 bytes x
tokens x vocabulary per rank, e.g. 8 GiB for one 16k-token row of a 128k vocabulary. Here the
logits of ``chunk`` tokens exist at a time: the forward keeps two numbers per token (the row's max
logit and sum of exponentials, reduced over the tensor-parallel group), and the backward computes
each chunk's logits again to form its softmax gradient. Peak memory for the loss goes from
tokens x vocabulary to chunk x vocabulary, for one more output-layer GEMM in the backward.

The arithmetic is megatron-core's ``vocab_parallel_cross_entropy`` (max-shifted logits, log of the
summed exponentials minus the target's shifted logit; gradient softmax - one-hot, times the
incoming gradient), so the results equal it to rounding. ``weight`` holds this rank's vocabulary
rows ``[rank * V_p, (rank + 1) * V_p)``; ``group`` is the tensor-parallel group (None: one rank).
The caller brings ``hidden`` into the tensor-parallel region (megatron's copy / sequence-parallel
gather), whose backward sums the per-rank input gradients as the output layer's own does.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _target_columns(labels: torch.Tensor, start: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(column of each label in this rank's shard, clamped to 0 outside it; whether it is inside)"""
    inside = (labels >= start) & (labels < start + size)
    return torch.where(inside, labels - start, torch.zeros_like(labels)), inside


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.matmul(hidden, weight.t()).float()


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, group):
        rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
        start = rank * weight.shape[0]
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        maxes, sums = torch.empty_like(nll), torch.empty_like(nll)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            logits = _chunk_logits(hidden[a:b], weight)
            m = _all_reduce(logits.max(dim=-1)[0], dist.ReduceOp.MAX, group)
            logits -= m.unsqueeze(-1)
            col, inside = _target_columns(labels[a:b], start, weight.shape[0])
            target = logits.gather(1, col.unsqueeze(1)).squeeze(1) * inside
            torch.exp(logits, out=logits)
            s = logits.sum(dim=-1)
            both = _all_reduce(torch.stack([target, s]), dist.ReduceOp.SUM, group)
            nll[a:b] = torch.log(both[1]) - both[0]
            maxes[a:b], sums[a:b] = m, both[1]
        ctx.save_for_backward(hidden, weight, labels, maxes, sums)
        ctx.chunk, ctx.start = chunk, start
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, labels, maxes, sums = ctx.saved_tensors
        n, chunk = hidden.shape[0], ctx.chunk
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            softmax = _chunk_logits(hidden[a:b], weight)
            softmax -= maxes[a:b].unsqueeze(-1)
            torch.exp(softmax, out=softmax)
            softmax /= sums[a:b].unsqueeze(-1)
            col, inside = _target_columns(labels[a:b], ctx.start, weight.shape[0])
            rows = torch.arange(b - a, device=softmax.device)
            softmax[rows, col] -= inside.float()
            softmax *= grad_nll[a:b].unsqueeze(-1)
            g = softmax.to(hidden.dtype)
            torch.matmul(g, weight, out=grad_hidden[a:b])
            # accumulated in fp32 inside the GEMM (beta = 1), as one GEMM over all tokens would
            grad_weight.addmm_(softmax.t(), hidden[a:b].float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token NLL [N] (fp32) of ``labels`` [N] under ``softmax(hidden @ weight.T)`` over the full
    vocabulary, whose rows this rank holds a shard of; ``hidden`` [N, H], ``weight`` [V_p, H].
    Differentiable in ``hidden`` and ``weight``; never holds more than ``chunk`` x V_p logits."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_nll takes hidden [N, H] and labels [N], got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    return _ChunkedNLL.apply(hidden, weight, labels, chunk, group)
