"""What every sampler shares (GPT: generation/sampling.py, T5: generation/seq2seq.py): the sampling
parameters, the output, and one decoding step (masking of the padded vocabulary, greedy or
top-k / top-p sampling, the TP source rank's choice on every rank, EOS and stop strings).
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
    fast_decode: bool = True
    """With the KV cache: the lean forward of generation/fast_decode.py where it supports the model
    (False: megatron's inference context)."""
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


@torch.no_grad()
def sample_step(logits: torch.Tensor, step: int, prompt_length: int, done: torch.Tensor, tokens: torch.Tensor,
                logprobs: torch.Tensor, mask: torch.Tensor, params: "SamplingParams", vocab_size: Optional[int],
                logits_processor, generator, decode, hidden: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decoding step shared by the GPT and T5 samplers: choose the next token from the full
    ``logits`` [b, V] (padded vocabulary masked, log-probs before any processor, greedy or
    filtered sampling, the TP source rank's choice everywhere), write it with its log-prob and mask
    at ``step`` (pad for finished rows), and return ``(choice, done)`` with EOS / stop strings applied.
    ``logits_processor(logits, hidden)`` also gets ``hidden`` [S, b, H], the final hidden states of
    the forward that gave ``logits`` (its last position), for heads (ILQL's Q/V shift)."""
    if vocab_size is not None:
        logits[:, vocab_size:] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    if logits_processor is not None:
        logits = logits_processor(logits, hidden)
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
