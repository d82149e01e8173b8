"""What the online loops share (PPO & co, RFT): the prompt dataset, sampling a batch of rollouts
from the policy, and scoring them with the reward function."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad
from nemo_rlhf.rewards import score as score_samples


class PromptDataset(torch.utils.data.Dataset):
    """Token-id prompts of any lengths. Item i is (prompt i left-padded to the longest prompt [P],
    its length); :func:`trim_left_padding` cuts a collated batch to its own longest prompt."""

    def __init__(self, prompts, pad_id: int):
        rows = [list(map(int, p)) for p in (prompts.tolist() if torch.is_tensor(prompts) else prompts)]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("online RL needs a non-empty list of non-empty prompts")
        self.ids, self.lengths = left_pad(rows, pad_id)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int):
        return self.ids[i], self.lengths[i]


def trim_left_padding(prompts: torch.Tensor, lengths: torch.Tensor):
    """[B, P] left-padded prompts -> ([B, P'] with P' = longest prompt of the batch, pad [B])."""
    p = prompts.shape[1]
    keep = int(lengths.max())
    return prompts[:, p - keep:], (keep - lengths).to(prompts.device)


@torch.no_grad()
def sample_rollouts(policy, prompts: torch.Tensor, pad: Optional[torch.Tensor], cfg, tokenizer, seed: int):
    """(tokens [B, P + N], generated-token mask [B, N]) sampled with the run's generation settings
    (``cfg``: the RunConfig; N = generation.max_new_tokens or task.max_length) from a private
    generator seeded by ``seed``."""
    g = cfg.generation
    gen = torch.Generator(device=prompts.device).manual_seed(seed)
    out = generate(policy, prompts, SamplingParams(
        max_new_tokens=g.max_new_tokens or cfg.task.max_length, temperature=g.temperature, top_k=g.top_k,
        top_p=g.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id), generator=gen,
        vocab_size=tokenizer.vocab_size, prompt_lengths=None if pad is None else prompts.shape[1] - pad)
    return out.tokens, out.mask


def score_rollouts(reward_fn: Callable, tokenizer, tokens: torch.Tensor, prompt_length: int,
                   pad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rewards [B] of [B, P + N] rollouts; the reward function sees each prompt without its padding
    (checked by nemo_rlhf.rewards.score: one finite number per sample)."""
    pad = [0] * len(tokens) if pad is None else pad.tolist()
    prompts = [tokenizer.decode(t[k:prompt_length].tolist()) for t, k in zip(tokens, pad)]
    completions = [tokenizer.decode(t[prompt_length:].tolist()) for t in tokens]
    samples = [p + c for p, c in zip(prompts, completions)]
    scores = torch.tensor(score_samples(reward_fn, samples, prompts, completions), dtype=torch.float32)
    return scores.to(tokens.device)


def concat_rollouts(parts, pad_id: int):
    """Rollouts of different prompt / generation widths, (tokens [b, P_i + N_i], generated mask
    [b, N_i], pad [b]) each, as one batch: prompts left-padded to the longest P, generations
    right-padded to the longest N (pad_id, mask 0). Returns (tokens, mask, pad)."""
    p = max(t.shape[1] - m.shape[1] for t, m, _ in parts)
    n = max(m.shape[1] for _, m, _ in parts)
    tokens, masks, pads = [], [], []
    for t, m, k in parts:
        pi, ni = t.shape[1] - m.shape[1], m.shape[1]
        row = torch.full((t.shape[0], p + n), pad_id, dtype=t.dtype, device=t.device)
        row[:, p - pi:p + ni] = t
        mm = torch.zeros((m.shape[0], n), dtype=m.dtype, device=m.device)
        mm[:, :ni] = m
        tokens.append(row)
        masks.append(mm)
        pads.append(k + (p - pi))
    return torch.cat(tokens), torch.cat(masks), torch.cat(pads)
