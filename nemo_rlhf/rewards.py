"""Reward functions: resolved from config (``module:function`` or a built-in name) or passed from
Python, called with ``(samples, prompts=..., completions=...)``, validated on every call."""
from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, List, Sequence


from nemo_rlhf.errors import RewardFunctionError  # noqa: F401  (re-exported)


def resolve_reward_fn(spec, task=None) -> Callable:
    """``spec``: a callable, ``"task"`` or the task's name (the built-in task's reward: randomwalks'
    optimality, arithmetic's exact match) or ``"package.module:function"``."""
    if callable(spec):
        return spec
    if spec in ("task", "randomwalks", "arithmetic"):
        if task is None or spec not in ("task", task.name):
            raise RewardFunctionError(f"reward_fn={spec} needs task.name={spec if spec != 'task' else 'randomwalks|arithmetic'}"
                                      f" (the run's task is {getattr(task, 'name', None)})")
        return task.reward_fn
    if not isinstance(spec, str) or ":" not in spec:
        raise RewardFunctionError(f"reward_fn={spec!r}: expected 'package.module:function' or 'task'")
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise RewardFunctionError(f"reward_fn={spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise RewardFunctionError(f"reward_fn={spec!r} is not callable")
    return fn


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def score(fn: Callable, samples: Sequence[str], prompts: Sequence[str], completions: Sequence[str]) -> List[float]:
    """Call ``fn`` and check its output: one finite float per sample."""
    try:
        out = fn(list(samples), prompts=list(prompts), completions=list(completions))
    except Exception as e:
        bad = None
        for i in range(len(samples)):  # find the first sample it fails on, for the message
            try:
                fn([samples[i]], prompts=[prompts[i]], completions=[completions[i]])
            except Exception:
                bad = i
                break
        where = f" on sample {bad} ({samples[bad]!r})" if bad is not None else ""
        raise RewardFunctionError(f"reward function {_name(fn)} raised {type(e).__name__}: {e}{where}") from e
    try:
        out = [float(x) for x in out]
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"reward function {_name(fn)} must return a list of numbers: {e}") from None
    if len(out) != len(samples):
        raise RewardFunctionError(f"reward function {_name(fn)} returned {len(out)} scores for "
                                  f"{len(samples)} samples")
    for i, x in enumerate(out):
        if not math.isfinite(x):
            raise RewardFunctionError(f"reward function {_name(fn)} returned {x} for sample {i} ({samples[i]!r})")
    return out


class WeightedRewards:
    """Several reward functions as one (``ppo.reward_fns`` + ``ppo.reward_weights``): the score of a
    sample is sum_i w_i * f_i(sample). Each function is checked on its own (an error names it);
    ``last`` keeps each one's scores of the latest call, for logging."""

    def __init__(self, named_fns: Sequence[tuple]):
        """``named_fns``: (name, function, weight) triples."""
        if not named_fns:
            raise RewardFunctionError("WeightedRewards needs at least one reward function")
        self.named_fns = list(named_fns)
        self.last: Dict[str, List[float]] = {}
        self.__qualname__ = " + ".join(f"{w:g} * {name}" for name, _, w in self.named_fns)

    def __call__(self, samples, prompts, completions) -> List[float]:
        self.last = {name: score(fn, samples, prompts, completions) for name, fn, _ in self.named_fns}
        return [sum(w * self.last[name][i] for name, _, w in self.named_fns) for i in range(len(samples))]


def weighted_rewards(specs: Sequence[str], weights: Sequence[float], task=None) -> WeightedRewards:
    """``ppo.reward_fns`` (each as ``reward_fn`` takes it) with ``ppo.reward_weights`` (default 1 each)."""
    weights = list(weights) or [1.0] * len(specs)
    if len(weights) != len(specs):
        raise RewardFunctionError(f"ppo.reward_weights has {len(weights)} weights for {len(specs)} ppo.reward_fns")
    names = [spec.rpartition(":")[2] if isinstance(spec, str) else _name(spec) for spec in specs]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return WeightedRewards([(n, resolve_reward_fn(spec, task), float(w)) for n, spec, w in zip(names, specs, weights)])


class RewardModelScorer:
    """A reward model as a reward function: a megatron GPT with a scalar head (``value_head``)
    loaded from a checkpoint; the score of a sample is the head's output at its last token.
    Works at any TP (the head reads the full hidden state on every rank) and PP (the stages run in
    turn, the last one's scores are broadcast)."""

    def __init__(self, path, model_cfg, parallel_cfg, tokenizer, batch_size: int = 64):
        from nemo_rlhf.models.gpt import build_gpt_chunks
        from nemo_rlhf.models.heads import attach_value_head
        from nemo_rlhf.weights import load_weights

        self.path, self.tokenizer, self.batch_size = str(path), tokenizer, batch_size
        self.model = [c.eval() for c in build_gpt_chunks(model_cfg, parallel_cfg, tokenizer.vocab_size)]
        for chunk in self.model:   # (this rank's chunks; the head lands on the last stage's)
            attach_value_head(chunk, model_cfg.hidden_size)
            for p in chunk.parameters():
                p.requires_grad_(False)
        load_weights(path, self.model, skip_prefixes=())   # the head must be in the checkpoint
        self.__qualname__ = f"RewardModelScorer({self.path})"

    def __call__(self, samples, prompts=None, completions=None, **_):
        import torch

        from nemo_rlhf.models.heads import value_head_output
        from nemo_rlhf.modules.forward_only import lm_across_stages

        out = []
        with torch.no_grad():
            for i in range(0, len(samples), self.batch_size):
                ids = [self.tokenizer.encode(s) or [self.tokenizer.eos_id] for s in samples[i:i + self.batch_size]]
                lengths = torch.tensor([len(x) for x in ids])
                tokens = torch.full((len(ids), int(lengths.max())), self.tokenizer.pad_id, dtype=torch.long)
                for j, x in enumerate(ids):
                    tokens[j, :len(x)] = torch.tensor(x)
                _, values = lm_across_stages(self.model, tokens, None, None, value_head_output)   # [B, S]
                out.extend(values.gather(1, (lengths - 1)[:, None]).squeeze(1).tolist())
        return out
