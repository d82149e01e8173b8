"""Rejection fine-tuning recipe (algorithm=rft, as trlX's RFT): sample, keep the best samples of
each prompt by a rising reward threshold, fine-tune on them, repeat (read one iteration top to
bottom in nemo_rlhf/modules/rft.py; the threshold math is nemo_rlhf/algorithms/rft.py). Prompts
and rewards come from the same places as PPO's (recipes/ppo.py :func:`prepare`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.schema import RunConfig, SFTWarmupConfig
from nemo_rlhf.modules.rft import RFTModule
from nemo_rlhf.recipes import ppo
from nemo_rlhf.recipes.common import Job, RunContext, load_initial_weights


@dataclass
class RFTConfig:
    """Rejection fine-tuning (``rft:`` block). One trainer step = one iteration: prompts_per_iteration
    prompts x num_generations samples -> keep each prompt's samples scoring at least the
    ``percentile`` quantile of its samples' rewards (and min_reward) -> ``epochs`` of SFT updates on
    them in global batches of trainer.global_batch_size."""

    prompts_per_iteration: int = 32
    """Prompts sampled per iteration, over all data-parallel ranks."""
    num_generations: int = 8
    """Samples per prompt."""
    start_percentile: float = 0.5
    """Quantile of a prompt's rewards a sample must reach in the first iteration ..."""
    end_percentile: float = 0.9
    """... rising linearly to this one over improve_steps iterations (trlX: 0.7 -> 0.95)."""
    improve_steps: int = 10
    min_reward: Optional[float] = None
    """Absolute floor of the threshold (e.g. 0.5 with a 0/1 reward: failures are never kept); null = none."""
    epochs: int = 1
    """SFT passes over an iteration's kept samples."""
    reward_fn: str = "task"
    """As ppo.reward_fn: the task's reward or 'package.module:function'."""
    reward_fns: List[str] = field(default_factory=list)
    reward_weights: List[float] = field(default_factory=list)
    reward_model: Optional[str] = None
    sft_warmup: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)
    """When model.path is null: SFT warm-up on the task's data first (steps=0: from random init)."""

    def __post_init__(self):
        for key in ("prompts_per_iteration", "num_generations", "improve_steps", "epochs"):
            _positive(getattr(self, key), f"rft.{key}")
        for key in ("start_percentile", "end_percentile"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"rft.{key} must be in [0, 1], got {getattr(self, key)}")
        _require(self.start_percentile <= self.end_percentile,
                 f"rft.start_percentile={self.start_percentile} is above rft.end_percentile={self.end_percentile}")
        _require(not self.reward_weights or len(self.reward_weights) == len(self.reward_fns),
                 f"rft.reward_weights has {len(self.reward_weights)} weights for {len(self.reward_fns)} rft.reward_fns")


Config = RFTConfig


def layout_problem(rcfg: RunConfig) -> Optional[str]:
    """Sampling runs across pipeline stages (virtual ones too); reward models need PP=1."""
    if rcfg.parallel.pipeline_model_parallel_size == 1:
        return None
    if rcfg.rft.reward_model is not None:
        return "rft.reward_model needs parallel.pipeline_model_parallel_size=1 (use a reward_fn)"
    return None


def prepare(ctx: RunContext, rcfg: RunConfig, block: RFTConfig, reward_fn=None, prompts=None):
    """Prompts and the reward function, as PPO reads them."""
    return ppo.prepare(ctx, rcfg, block, reward_fn=reward_fn, prompts=prompts)


def build(ctx: RunContext, rcfg: RunConfig, block: RFTConfig, data, rd, config_yaml: str) -> Job:
    module = RFTModule(rcfg, data.prompt_ids, ctx.tokenizer, data.reward_fn, rd, ctx.evaluate_fn, ctx.dp_rank,
                       ctx.dp_size, config_yaml=config_yaml)
    return Job(module, load_initial=partial(load_initial_weights, module.engine), summary=data.summary)
