"""Evaluation sharded over data-parallel ranks, with results independent of the layout.

The rows to sample (prompts, each repeated for its samples) are cut into fixed chunks of
``CHUNK`` rows; chunk c is sampled with a generator seeded by (seed, c) and data-parallel rank r
takes the chunks c = r, r + DP, ... Each rank scores its rows, the per-metric sums are added over
the data-parallel group, and every rank returns the same means: the same numbers at DP=1, 2, ...
(the chunks and their seeds do not depend on the layout), computed DP times faster. Tensor and
pipeline ranks of one replica run the same chunks (generation is a collective there).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch

CHUNK = 256


def sharded_sums(model, prompts: Sequence[Sequence[int]], params, seed: int, score: Callable,
                 num_metrics: int, vocab_size: int, logits_processor=None) -> List[float]:
    """Sums over all rows of ``score(row, completion ids through EOS) -> num_metrics floats``, plus
    the row count last, over every data-parallel rank. ``prompts``: token-id lists (left-padded per
    chunk); ``params``: nemo_rlhf.generation.SamplingParams."""
    from nemo_rlhf.generation.sampling import generate, left_pad
    from nemo_rlhf.parallel.reductions import all_reduce_sum, data_parallel_group

    group = data_parallel_group()
    rank = torch.distributed.get_rank(group) if group is not None else 0
    size = torch.distributed.get_world_size(group) if group is not None else 1
    from nemo_rlhf.generation.pipeline import as_chunks

    device = next(as_chunks(model)[0].parameters()).device
    sums = torch.zeros(num_metrics + 1, dtype=torch.float64)
    for c in range(rank, (len(prompts) + CHUNK - 1) // CHUNK, size):
        rows = range(c * CHUNK, min((c + 1) * CHUNK, len(prompts)))
        ids, lengths = left_pad([prompts[i] for i in rows], params.pad_id)
        generator = None if params.greedy else torch.Generator(device=device).manual_seed(seed * 1009 + c)
        with torch.no_grad():
            out = generate(model, ids.to(device), params, generator=generator, vocab_size=vocab_size,
                           prompt_lengths=lengths.to(device), logits_processor=logits_processor)
        for j, i in enumerate(rows):
            completion = out.completions[j][out.mask[j].bool()].tolist()
            sums[:-1] += torch.tensor(score(i, completion), dtype=torch.float64)
            sums[-1] += 1
    return all_reduce_sum(sums, group).tolist()
