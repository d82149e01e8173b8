"""Sampling evaluation of a policy on the randomwalks task."""
from __future__ import annotations

from typing import Dict

import torch

from nemo_rlhf.data.tokenizers import CharTokenizer
from nemo_rlhf.generation.sampling import SamplingParams, generate
from nemo_rlhf.tasks.randomwalks import RandomWalks, node_name


def _score_batch(task: RandomWalks, tokenizer: CharTokenizer, starts, out) -> list:
    scores = []
    for i, start in enumerate(starts):
        ids = out.completions[i][out.mask[i].bool()].tolist()
        ended = len(ids) > 0 and ids[-1] == tokenizer.eos_id
        if ended:
            ids = ids[:-1]
        scores.append(task.score(start, tokenizer.convert_ids_to_tokens(ids), ended_with_eos=ended))
    return scores


@torch.no_grad()
def evaluate_randomwalks(model: torch.nn.Module, task: RandomWalks, tokenizer: CharTokenizer,
                         samples_per_start: int, seed: int, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, max_new_tokens: int | None = None, logits_processor=None,
                         suffix: str = "") -> Dict[str, float]:
    """``optimality``/``valid_rate`` from temperature samples (``samples_per_start`` per start)
    and ``optimality_greedy``/``valid_rate_greedy`` from greedy decoding, over the start nodes
    from which the goal is reachable in fewer than max_length nodes. The sampling generator is
    private (seeded by ``seed``), so evaluation never perturbs the training RNG stream."""
    device = next(model.parameters()).device
    starts = task.eval_starts
    n_new = max_new_tokens or task.max_length  # max_length - 1 more nodes, then EOS
    vocab = tokenizer.vocab_size
    prompts = torch.tensor([[tokenizer.ids[node_name(s)]] for s in starts], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    base = dict(max_new_tokens=n_new, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    sampled = generate(model, prompts.repeat_interleave(samples_per_start, 0),
                       SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **base),
                       generator=gen, vocab_size=vocab, logits_processor=logits_processor)
    greedy = generate(model, prompts, SamplingParams(greedy=True, **base), vocab_size=vocab,
                      logits_processor=logits_processor)
    sample_starts = [s for s in starts for _ in range(samples_per_start)]
    metrics = task.summarize(_score_batch(task, tokenizer, sample_starts, sampled), suffix=suffix)
    metrics.update(task.summarize(_score_batch(task, tokenizer, starts, greedy), suffix=suffix + "_greedy"))
    metrics["behaviour_optimality"] = task.behaviour_optimality()
    return metrics
