"""The randomwalks task (after trlX's examples/randomwalks).

A random directed graph on ``num_nodes`` nodes named a, b, c, ...; each edge is present with
probability ``edge_prob``, no self-loops, redrawn until every node has an out-edge. Node 'a' is
the goal and absorbing. Training data are random walks of at most ``max_length`` nodes from
random non-goal starts, stopping at the goal. The prompt is the start node, the completion the
rest of the walk followed by EOS.

Metrics of a generated walk from start s (see shared/DESIGN.md):
  length     = 1-based position of the first goal node; an invalid edge, an unknown token or
               not reaching the goal within max_length count as max_length.
  optimality = (max_length - length) / (max_length - shortest_length(s)), in [0, 1].
  valid      = every transition is an edge and the walk ends (EOS) right at the goal, or runs to
               max_length nodes without reaching it (anything after the max_length-th node is
               past the generation cap and ignored). Tokens after the goal make it invalid.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

GOAL = 0
EOS = "<eos>"


def node_name(i: int) -> str:
    return chr(ord("a") + i)


@dataclass
class WalkScore:
    length: int
    optimality: float
    valid: bool


class RandomWalks:
    """Graph, training walks and metrics. Everything is a pure function of the constructor args."""

    name = "randomwalks"

    def __init__(self, num_nodes: int = 21, edge_prob: float = 0.1, max_length: int = 10,
                 num_walks: int = 1000, seed: int = 1000):
        if not 2 <= num_nodes <= 26:
            raise ValueError(f"num_nodes must be in [2, 26], got {num_nodes}")
        self.num_nodes, self.edge_prob, self.max_length = num_nodes, edge_prob, max_length
        self.num_walks, self.seed = num_walks, seed
        rng = np.random.RandomState(seed)
        for _ in range(10_000):
            adj = rng.rand(num_nodes, num_nodes) < edge_prob
            np.fill_diagonal(adj, False)
            if adj.any(axis=1).all():
                break
        else:
            raise ValueError(f"no graph with an out-edge at every node after 10000 draws "
                             f"(num_nodes={num_nodes}, edge_prob={edge_prob}); raise edge_prob")
        adj[GOAL, :] = False
        adj[GOAL, GOAL] = True  # absorbing goal
        self.adj = adj
        self.shortest = self._shortest_lengths()
        self.walks = [self._random_walk(rng) for _ in range(num_walks)]

    # -- graph ------------------------------------------------------------------------------
    def _shortest_lengths(self) -> Dict[int, int]:
        """Shortest walk length (in nodes, start and goal included) from each node to the goal,
        capped at max_length (unreachable -> max_length). BFS on the reversed graph."""
        dist = {GOAL: 1}
        queue = deque([GOAL])
        while queue:
            v = queue.popleft()
            for u in np.nonzero(self.adj[:, v])[0]:
                u = int(u)
                if u not in dist:
                    dist[u] = dist[v] + 1
                    queue.append(u)
        return {s: min(dist.get(s, self.max_length), self.max_length) for s in range(self.num_nodes)}

    def _random_walk(self, rng: np.random.RandomState) -> List[int]:
        node = int(rng.randint(GOAL + 1, self.num_nodes))
        walk = [node]
        for _ in range(self.max_length - 1):
            node = int(rng.choice(np.nonzero(self.adj[node])[0]))
            walk.append(node)
            if node == GOAL:
                break
        return walk

    @property
    def vocab(self) -> List[str]:
        return [node_name(i) for i in range(self.num_nodes)]

    @property
    def eval_starts(self) -> List[int]:
        """Start nodes from which the goal is reachable in fewer than max_length nodes
        (from the others any walk scores optimality 1.0, so they say nothing)."""
        return [s for s in range(1, self.num_nodes) if self.shortest[s] < self.max_length]

    def walk_text(self, walk: Sequence[int]) -> str:
        return "".join(node_name(i) for i in walk)

    # -- what recipes read --------------------------------------------------------------------
    def sft_samples(self) -> List[List[str]]:
        """[prompt, completion] pairs: each training walk's start node and the rest of it."""
        return [[self.walk_text(w[:1]), self.walk_text(w[1:])] for w in self.walks]

    def prompts(self) -> List[str]:
        """The start node of each training walk (as trlX)."""
        return [self.walk_text(w[:1]) for w in self.walks]

    def evaluate(self, model, tokenizer, samples_per_start: int, seed: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, max_new_tokens: Optional[int] = None, logits_processor=None,
                 suffix: str = "") -> Dict[str, float]:
        """``optimality``/``valid_rate``/``length`` of temperature samples (``samples_per_start`` per
        start) and ``..._greedy`` of greedy decoding, over the start nodes from which the goal is
        reachable in fewer than max_length nodes; sharded over data-parallel ranks with the same
        result at any layout (nemo_rlhf/tasks/sharded.py). The sampling generators are private
        (seeded by ``seed``), so evaluation never perturbs the training RNG stream."""
        from nemo_rlhf.generation.sampling import SamplingParams
        from nemo_rlhf.tasks.sharded import sharded_sums

        base = dict(max_new_tokens=max_new_tokens or self.max_length, eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id)   # max_length - 1 more nodes, then EOS

        def run(starts, params, name):
            def score(i, ids):
                ended = len(ids) > 0 and ids[-1] == tokenizer.eos_id
                ids = ids[:-1] if ended else ids
                s = self.score(starts[i], tokenizer.convert_ids_to_tokens(ids), ended_with_eos=ended)
                return s.optimality, float(s.valid), float(s.length)

            total = sharded_sums(model, [[tokenizer.ids[node_name(s)]] for s in starts], params, seed, score, 3,
                                 tokenizer.vocab_size, logits_processor)
            n = max(total[-1], 1.0)
            return {f"optimality{name}": total[0] / n, f"valid_rate{name}": total[1] / n, f"length{name}": total[2] / n}

        starts = self.eval_starts
        metrics = run([s for s in starts for _ in range(samples_per_start)],
                      SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **base), suffix)
        metrics.update(run(starts, SamplingParams(greedy=True, **base), suffix + "_greedy"))
        metrics["behaviour_optimality"] = self.behaviour_optimality()
        return metrics

    # -- metrics ----------------------------------------------------------------------------
    def score(self, start: int, completion: Sequence[str], ended_with_eos: bool) -> WalkScore:
        """Score ``start`` followed by ``completion`` (node names or other tokens; EOS excluded).
        ``ended_with_eos``: generation stopped on EOS right after ``completion``."""
        names = {node_name(i): i for i in range(self.num_nodes)}
        walk = [node_name(start)] + list(completion)
        length, valid, prev = self.max_length, True, None
        reached_at = None
        # Only the first max_length nodes count: generation is capped there (trlX truncates too).
        for pos, tok in enumerate(walk[:self.max_length]):
            node = names.get(tok)
            if node is None or (prev is not None and not self.adj[prev, node]):
                valid = False
                break
            if node == GOAL:
                reached_at = pos
                length = pos + 1
                break
            prev = node
        if valid:
            if reached_at is not None:
                # must stop (EOS) right at the goal: nothing after it
                valid = ended_with_eos and reached_at == len(walk) - 1
            else:
                # never reached the goal: valid only if it ran the full max_length nodes
                valid = len(walk) >= self.max_length
        length = min(length, self.max_length)
        best = self.shortest[start]
        denom = self.max_length - best
        optimality = (self.max_length - length) / denom if denom > 0 else 1.0
        return WalkScore(length=length, optimality=float(optimality), valid=bool(valid))

    def walk_optimality(self, walk: Sequence[int]) -> float:
        """Optimality of a training walk (node ids, start first)."""
        return self.score(walk[0], [node_name(i) for i in walk[1:]], ended_with_eos=True).optimality

    def behaviour_optimality(self, starts: Optional[Sequence[int]] = None) -> float:
        """Mean optimality of the training walks from the evaluation starts (the behaviour data)."""
        keep = set(self.eval_starts if starts is None else starts)
        vals = [self.walk_optimality(w) for w in self.walks if w[0] in keep]
        return float(np.mean(vals)) if vals else float("nan")

    def summarize(self, scores: Sequence[WalkScore], suffix: str = "") -> Dict[str, float]:
        return {
            f"optimality{suffix}": float(np.mean([s.optimality for s in scores])),
            f"valid_rate{suffix}": float(np.mean([s.valid for s in scores])),
            f"length{suffix}": float(np.mean([s.length for s in scores])),
        }

    def reward_fn(self, samples: Sequence[str], prompts=None, completions=None, **_) -> List[float]:
        """Optimality of each decoded walk (prompt node + completion, EOS stripped), as trlX's
        randomwalks reward. Only looks up to the first goal: pair it with a KL penalty."""
        out = []
        for s in samples:
            if not s:
                out.append(0.0)
                continue
            start = ord(s[0]) - ord("a")
            if not 0 <= start < self.num_nodes:
                out.append(0.0)
                continue
            out.append(self.score(start, list(s[1:]), ended_with_eos=True).optimality)
        return out
