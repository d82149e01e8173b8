"""Reward-model recipe (algorithm=rm): Bradley-Terry on preference pairs, a scalar head on a
megatron GPT read at the last completion token. PPO takes the result as
``ppo.reward_model=<run dir>/checkpoints/step_X``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.schema import RunConfig
import numpy as np

from nemo_rlhf.data.preference import PreferenceDataset, invalid_edge_pairs, randomwalk_pairs, split_walks
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.modules.reward_model import RewardModelModule
from nemo_rlhf.recipes.common import Job, RunContext, file_examples, load_initial_weights
from nemo_rlhf.tasks import offline_data_task


@dataclass
class RMConfig:
    """Reward-model training (``rm:`` block)."""

    num_pairs: int = 4000
    """Pairs built from the task's walks when data.train_file is null (training + held-out)."""
    heldout_fraction: float = 0.1
    """Pairs kept out of training to measure pairwise accuracy. From the task, the held-out pairs are
    built from walks that no training pair contains (split by walk identity); from a file, the last
    rows are held out."""
    invalid_edge_fraction: float = 0.5
    """From the task: this share of the training pairs is a valid walk against the same walk with one
    invalid edge (equal length, so length cannot decide); the held-out set has such pairs too,
    reported as accuracy_equal_length."""
    margin: float = 0.0

    def __post_init__(self):
        _positive(self.num_pairs, "rm.num_pairs")
        _require(0 < self.heldout_fraction < 1, f"rm.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _require(0 <= self.invalid_edge_fraction < 1,
                 f"rm.invalid_edge_fraction must be in [0, 1), got {self.invalid_edge_fraction}")


Config = RMConfig


def prepare(ctx: RunContext, rcfg: RunConfig, block: RMConfig):
    """(training pairs, held-out pairs, equal-length held-out pairs or None, summary extras)."""
    pairs, extra = file_examples(ctx, rcfg, "preference")
    if pairs is not None:
        if len(pairs) < 2:
            raise ConfigError(f"rm: {len(pairs)} preference pair(s); need at least 2 (training + held-out)")
        n_held = max(1, int(len(pairs) * block.heldout_fraction))
        return pairs[:-n_held], pairs[-n_held:], None, extra
    return (*task_pairs(ctx, block), extra)


def task_pairs(ctx: RunContext, block: RMConfig):
    """From the task's walks, split by walk identity (no held-out pair contains a training walk):
    training pairs (more optimal chosen, plus the invalid-edge share), held-out pairs of the same kind,
    and held-out valid-vs-invalid-edge pairs of equal length."""
    task, tok, seed = offline_data_task(ctx.task, "rm"), ctx.tokenizer, ctx.rcfg.trainer.seed
    train_walks, held_walks = split_walks(task.walks, block.heldout_fraction, seed)
    n_held = max(1, int(block.num_pairs * block.heldout_fraction))
    n_train = block.num_pairs - n_held
    n_invalid = int(n_train * block.invalid_edge_fraction)
    eos = [tok.eos_id]
    with_eos = lambda pairs: [(p, c + eos, r + eos) for p, c, r in pairs]
    train = randomwalk_pairs(task, tok, n_train - n_invalid, seed, train_walks) + \
        invalid_edge_pairs(task, tok, train_walks, n_invalid, seed + 1)
    order = np.random.RandomState(seed + 2).permutation(len(train))
    held = randomwalk_pairs(task, tok, n_held, seed + 3, held_walks)
    equal = invalid_edge_pairs(task, tok, held_walks, n_held, seed + 4)
    return with_eos([train[i] for i in order]), with_eos(held), with_eos(equal)


def build(ctx: RunContext, rcfg: RunConfig, block: RMConfig, data, rd, config_yaml: str) -> Job:
    train_pairs, held_pairs, equal_pairs, extra = data
    tok = ctx.tokenizer

    def dataset(pairs):
        return PreferenceDataset.build(pairs, rcfg.model.seq_length, tok.pad_id, tok.eos_id, add_eos=False)

    train_set, heldout = dataset(train_pairs), dataset(held_pairs)
    equal = dataset(equal_pairs) if equal_pairs else None
    module = RewardModelModule(rcfg, train_set, heldout, tok.vocab_size, rd, ctx.dp_rank, ctx.dp_size,
                               config_yaml=config_yaml, heldout_equal_length=equal)
    # the head starts fresh from an SFT / LM checkpoint
    return Job(module, load_initial=partial(load_initial_weights, module.engine),
               summary={"num_pairs": len(train_set), "heldout_pairs": len(heldout),
                        "heldout_equal_length_pairs": len(equal) if equal is not None else 0, **extra})
