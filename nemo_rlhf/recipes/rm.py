"""Reward-model recipe (algorithm=rm): Bradley-Terry on preference pairs, a scalar head on a
megatron GPT read at the last completion token. PPO takes the result as
``ppo.reward_model=<run dir>/checkpoints/step_X``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.preference import PreferenceDataset
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.modules.reward_model import RewardModelModule
from nemo_rlhf.recipes.common import Job, RunContext, file_examples, load_initial_weights, walk_pairs


@dataclass
class RMConfig:
    """Reward-model training (``rm:`` block)."""

    num_pairs: int = 4000
    """Pairs built from the task's walks when data.train_file is null."""
    heldout_fraction: float = 0.1
    """Pairs kept out of training to measure pairwise accuracy."""
    margin: float = 0.0

    def __post_init__(self):
        _positive(self.num_pairs, "rm.num_pairs")
        _require(0 < self.heldout_fraction < 1, f"rm.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


Config = RMConfig


def prepare(ctx: RunContext, rcfg: RunConfig, block: RMConfig):
    pairs, extra = file_examples(ctx, rcfg, "preference")
    if pairs is None:
        pairs = walk_pairs(ctx, block.num_pairs)
    if len(pairs) < 2:
        raise ConfigError(f"rm: {len(pairs)} preference pair(s); need at least 2 (training + held-out)")
    return pairs, extra


def build(ctx: RunContext, rcfg: RunConfig, block: RMConfig, data, rd, config_yaml: str) -> Job:
    pairs, extra = data
    tok = ctx.tokenizer
    n_held = max(1, int(len(pairs) * block.heldout_fraction))

    def dataset(pairs):
        return PreferenceDataset.build(pairs, rcfg.model.seq_length, tok.pad_id, tok.eos_id, add_eos=False)

    train_set, heldout = dataset(pairs[:-n_held]), dataset(pairs[-n_held:])
    module = RewardModelModule(rcfg, train_set, heldout, tok.vocab_size, rd, ctx.dp_rank, ctx.dp_size,
                               config_yaml=config_yaml)
    # the head starts fresh from an SFT / LM checkpoint
    return Job(module, load_initial=partial(load_initial_weights, module.engine),
               summary={"num_pairs": len(train_set), "heldout_pairs": len(heldout), **extra})
