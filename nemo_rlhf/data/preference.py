"""Preference pairs as padded tensors [N, 2, S] (index 0 = chosen, 1 = rejected)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from nemo_rlhf.data.batches import PreferenceBatch


@dataclass
class PreferenceDataset(torch.utils.data.Dataset):
    tokens: torch.Tensor     # [N, 2, S] prompt + completion + EOS, right-padded
    labels: torch.Tensor     # [N, 2, S] tokens shifted left
    loss_mask: torch.Tensor  # [N, 2, S] 1 where labels are completion tokens
    ref_logps: torch.Tensor  # [N, 2] reference log-probs (filled by the DPO module when precomputed)

    def __len__(self):
        return self.tokens.shape[0]

    def __getitem__(self, i) -> PreferenceBatch:
        return {"tokens": self.tokens[i], "labels": self.labels[i], "loss_mask": self.loss_mask[i],
                "ref_logps": self.ref_logps[i]}

    @classmethod
    def build(cls, pairs: Sequence[Tuple[List[int], List[int], List[int]]], seq_length: int, pad_id: int,
              eos_id: int, add_eos: bool = True) -> "PreferenceDataset":
        """``pairs`` of (prompt ids, chosen completion ids, rejected completion ids); EOS is
        appended unless ``add_eos=False`` (the file loader appends it itself)."""
        n = len(pairs)
        if n == 0:
            raise ValueError("no preference pairs")
        tokens = torch.full((n, 2, seq_length + 1), pad_id, dtype=torch.long)
        mask = torch.zeros(n, 2, seq_length + 1)
        for i, (prompt, chosen, rejected) in enumerate(pairs):
            for j, completion in enumerate((chosen, rejected)):
                seq = list(prompt) + list(completion) + ([eos_id] if add_eos else [])
                if len(seq) > seq_length + 1:
                    raise ValueError(f"pair {i}: {len(seq)} tokens, more than seq_length + 1 = {seq_length + 1}")
                tokens[i, j, :len(seq)] = torch.tensor(seq)
                mask[i, j, len(prompt):len(seq)] = 1.0
        return cls(tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous(), mask[..., 1:].contiguous(),
                   torch.zeros(n, 2))


def split_walks(walks, heldout_fraction: float, seed: int):
    """(training walks, held-out walks), disjoint by walk identity: each distinct walk (node sequence)
    goes to one side, about ``heldout_fraction`` of the distinct walks to the held-out side."""
    distinct = sorted({tuple(w) for w in walks})
    rng = np.random.RandomState(seed)
    held = {distinct[i] for i in rng.permutation(len(distinct))[:max(1, int(len(distinct) * heldout_fraction))]}
    return [w for w in walks if tuple(w) not in held], [w for w in walks if tuple(w) in held]


def invalid_edge_pairs(task, tokenizer, walks, num_pairs: int, seed: int):
    """(prompt, walk, the same walk with one interior node replaced so that an edge is invalid): both
    completions have the same length and end at the goal, so length cannot tell them apart; the
    task scores the walk above 0 (walks that reach the goal early) and the corrupted one 0."""
    rng = np.random.RandomState(seed)
    usable = [w for w in walks if len(w) >= 3 and task.walk_optimality(w) > 0]
    if not usable:
        raise ValueError("no walk of 3 or more nodes to corrupt")
    pairs = []
    while len(pairs) < num_pairs:
        w = list(usable[rng.randint(len(usable))])
        i = 1 + rng.randint(len(w) - 2)
        bad = [x for x in range(1, task.num_nodes) if x != w[i] and not task.adj[w[i - 1], x]]
        if not bad:
            continue
        corrupted = w[:i] + [bad[rng.randint(len(bad))]] + w[i + 1:]
        enc = lambda walk: tokenizer.encode(task.walk_text(walk[1:]))
        pairs.append((tokenizer.encode(task.walk_text(w[:1])), enc(w), enc(corrupted)))
    return pairs


def randomwalk_pairs(task, tokenizer, num_pairs: int, seed: int, walks=None):
    """Two walks (of ``walks``, default the task's training walks) from the same start with different
    optimality; the better one is chosen."""
    rng = np.random.RandomState(seed)
    by_start: Dict[int, list] = {}
    for w in task.walks if walks is None else walks:
        by_start.setdefault(w[0], []).append(w)
    starts = [s for s, ws in by_start.items() if len({task.walk_optimality(w) for w in ws}) > 1]
    if not starts:
        raise ValueError("no start node has two walks of different optimality to pair")
    pairs = []
    while len(pairs) < num_pairs:
        ws = by_start[starts[rng.randint(len(starts))]]
        a, b = ws[rng.randint(len(ws))], ws[rng.randint(len(ws))]
        oa, ob = task.walk_optimality(a), task.walk_optimality(b)
        if oa == ob:
            continue
        chosen, rejected = (a, b) if oa > ob else (b, a)
        enc = lambda w: tokenizer.encode(task.walk_text(w[1:]))
        pairs.append((tokenizer.encode(task.walk_text(a[:1])), enc(chosen), enc(rejected)))
    return pairs


@dataclass
class KTODataset(PreferenceDataset):
    """Unpaired examples for KTO as [N, 2, S]: index 0 = (prompt, its completion), index 1 =
    (the same prompt, another example's completion) for the KL reference point;
    ``desirable`` [N] is 1.0 for desirable completions."""

    desirable: torch.Tensor = None

    def __getitem__(self, i) -> PreferenceBatch:
        return {**super().__getitem__(i), "desirable": self.desirable[i]}

    @classmethod
    def build_unpaired(cls, examples: Sequence[Tuple[List[int], List[int], bool]], seq_length: int, pad_id: int,
                       eos_id: int, seed: int, add_eos: bool = True) -> "KTODataset":
        """``examples`` of (prompt ids, completion ids, desirable). The mismatched completion of
        example i is that of example perm[i], a random derangement (never its own), cut to fit."""
        n = len(examples)
        if n < 2:
            raise ValueError(f"KTO needs at least 2 examples (the KL term pairs prompts with other "
                             f"examples' completions), got {n}")
        rng = np.random.RandomState(seed)
        perm = (np.arange(n) + rng.randint(1, n, size=n)) % n  # never i itself
        budget = seq_length + 1
        triples = []
        for i, (prompt, completion, _) in enumerate(examples):
            other = list(examples[perm[i]][1])
            room = budget - len(prompt) - (1 if add_eos else 0)  # >= 1: example i itself fits
            triples.append((prompt, completion, other[:room]))
        base = PreferenceDataset.build(triples, seq_length, pad_id, eos_id, add_eos=add_eos)
        desirable = torch.tensor([float(bool(d)) for _, _, d in examples])
        return cls(base.tokens, base.labels, base.loss_mask, base.ref_logps, desirable)


def unpair(pairs: Sequence[Tuple[List[int], List[int], List[int]]]):
    """Preference pairs -> unpaired KTO examples: (prompt, chosen, True), (prompt, rejected, False)."""
    out = []
    for prompt, chosen, rejected in pairs:
        out += [(prompt, chosen, True), (prompt, rejected, False)]
    return out
