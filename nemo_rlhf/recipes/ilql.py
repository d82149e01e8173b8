"""ILQL recipe (algorithm=ilql): offline RL on (sample, reward) pairs with Q / target-Q / V heads
on a megatron GPT; sampling shifts the policy's logits by beta * (min target Q - V)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.ilql import ILQLDataset, load_jsonl_samples
from nemo_rlhf.modules.ilql import ILQLModule, ilql_logits_processor
from nemo_rlhf.recipes.common import Job, RunContext, load_initial_weights
from nemo_rlhf.tasks import offline_data_task


@dataclass
class ILQLConfig:
    """ILQL (``ilql:`` block): offline RL on (sample, reward) pairs (Snell et al. 2022, as trlX)."""

    tau: float = 0.7
    """Expectile of the V regression."""
    gamma: float = 0.99
    alpha: float = 1.0
    """Weight of the V loss."""
    cql_scale: float = 0.1
    awac_scale: float = 1.0
    awac_beta: float = 0.0
    """AWAC advantage temperature (0 = plain behaviour cloning weight 1, as trlX's default)."""
    two_qs: bool = True
    steps_for_target_q_sync: int = 5
    target_sync_rate: float = 1.0
    """Polyak rate of the target-Q update every steps_for_target_q_sync steps (1 = copy)."""
    reward_normalization: str = "standard"
    """standard ((r - mean) / std over the dataset, as trlX) | none"""
    beta: float = 1.0
    """Sampling: logits = log pi + beta * (min target Q - V)."""
    gen_top_k: int = 20
    samples_path: Optional[str] = None
    """JSONL with {"sample": str | [prompt, completion], "reward": float} per line; null = the task's
    walks labeled with their optimality."""

    def __post_init__(self):
        _require(0 < self.tau < 1, f"ilql.tau must be in (0, 1), got {self.tau}")
        _require(0 <= self.gamma <= 1, f"ilql.gamma must be in [0, 1], got {self.gamma}")
        _positive(self.steps_for_target_q_sync, "ilql.steps_for_target_q_sync")
        _require(0 < self.target_sync_rate <= 1, f"ilql.target_sync_rate must be in (0, 1], got {self.target_sync_rate}")
        _require(self.reward_normalization in ("standard", "none"),
                 f"ilql.reward_normalization must be standard|none, got {self.reward_normalization!r}")
        _require(self.beta >= 0, f"ilql.beta must be >= 0, got {self.beta}")




Config = ILQLConfig


def prepare(ctx: RunContext, rcfg: RunConfig, block: ILQLConfig, samples=None, rewards=None):
    """Samples and rewards from Python, block.samples_path, or the task's walks labeled with their optimality."""
    if samples is None and block.samples_path:
        samples, rewards = load_jsonl_samples(block.samples_path)
    elif samples is None:
        task = offline_data_task(ctx.task, "ilql")
        samples = [task.walk_text(w) for w in task.walks]
        rewards = [task.walk_optimality(w) for w in task.walks]
    return ILQLDataset.build(samples, rewards, ctx.tokenizer, rcfg.model.seq_length, block.reward_normalization)


def generation_processor(module, block: ILQLConfig, beta: Optional[float] = None):
    """(logits processor, top-k) with which an ILQL policy samples (``beta`` defaults to block.beta)."""
    return ilql_logits_processor(module, block.beta if beta is None else beta), block.gen_top_k


def build(ctx: RunContext, rcfg: RunConfig, block: ILQLConfig, dataset, rd, config_yaml: str) -> Job:
    task, tok = ctx.task, ctx.tokenizer

    def evaluate_fn(engine, step):
        gpt, gen = engine.stages, rcfg.generation   # (the heads sit on the last chunk)
        common = dict(seed=rcfg.trainer.seed + step, temperature=gen.temperature, top_k=block.gen_top_k,
                      max_new_tokens=gen.max_new_tokens)
        metrics = task.evaluate(gpt, tok, rcfg.task.eval_samples_per_start,
                                logits_processor=ilql_logits_processor(gpt[-1], block.beta), **common)
        metrics.update(task.evaluate(gpt, tok, rcfg.task.eval_samples_per_start, suffix="_beta0",
                                     logits_processor=ilql_logits_processor(gpt[-1], 0.0), **common))
        metrics["beta"] = block.beta
        return metrics

    module = ILQLModule(rcfg, dataset, tok.vocab_size, rd, evaluate_fn, ctx.dp_rank, ctx.dp_size,
                        config_yaml=config_yaml)
    # the heads start fresh from an SFT / LM checkpoint
    return Job(module, load_initial=partial(load_initial_weights, module.engine, skip_prefixes=("ilql_heads.",)),
               summary={"num_samples": len(dataset)})


def layout_problem(rcfg: RunConfig) -> Optional[str]:
    """ILQL's batches are not packed: its V(s') reads the position after each action (one past the
    last a loss reads), which a packed span would hand to the next sequence."""
    if rcfg.data.packing:
        return "data.packing is not supported (its V(s') reads the position after each action): set data.packing=false"
    return None
