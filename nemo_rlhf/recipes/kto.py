"""KTO recipe (algorithm=kto; Ethayarajh et al. 2024): unpaired completions labelled desirable or
undesirable (data.train_file prompt/completion/label, or the task's preference pairs unpaired),
trained by the DPO family's module (recipes/dpo.py :func:`preference_job`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from nemo_rlhf.algorithms.dpo import KTO_LOSSES
from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.schema import RunConfig, SFTWarmupConfig
from nemo_rlhf.data.preference import KTODataset, unpair
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.logging import get_logger
from nemo_rlhf.recipes.common import Job, RunContext, file_examples, walk_pairs
from nemo_rlhf.recipes.dpo import preference_job

log = get_logger(__name__)


@dataclass
class KTOConfig:
    """KTO (``kto:`` block; Ethayarajh et al. 2024) on unpaired completions labelled desirable or
    undesirable. The reference point z0 is KL(policy || reference) estimated over the whole global
    batch (all micro-batches and data-parallel ranks of a step) from mismatched prompt/completion
    pairs (each prompt with another example's completion), clamped at 0 and detached, so the loss
    does not depend on trainer.micro_batch_size or the parallel layout."""

    beta: float = 0.1
    loss_type: str = "kto"
    """kto (Ethayarajh et al. 2024, Eq. 8): the variant, one row of nemo_rlhf.algorithms.dpo.KTO_LOSSES."""
    desirable_weight: float = 1.0
    """lambda_D; the paper keeps lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """lambda_U."""
    reference: str = "precomputed"
    """precomputed (one pass before training, saved as reference_logps.pt) | model (frozen copy)"""
    num_pairs: int = 4000
    """Without data.train_file: preference pairs built from the task's walks, then unpaired (each
    pair gives one desirable and one undesirable example, as TRL's unpair_preference_dataset)."""
    sft_warmup: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)
    """When model.path is null: SFT warm-up before KTO (the reference is that SFT policy)."""

    def __post_init__(self):
        _require(self.loss_type in KTO_LOSSES,
                 f"kto.loss_type must be {'|'.join(KTO_LOSSES)}, got {self.loss_type!r}")
        _require(self.beta > 0, f"kto.beta must be > 0, got {self.beta}")
        _require(self.desirable_weight > 0 and self.undesirable_weight > 0,
                 f"kto.desirable_weight and kto.undesirable_weight must be > 0, got "
                 f"{self.desirable_weight} and {self.undesirable_weight}")
        _require(self.reference in ("precomputed", "model"),
                 f"kto.reference must be precomputed|model, got {self.reference!r}")
        _positive(self.num_pairs, "kto.num_pairs")




Config = KTOConfig


def prepare(ctx: RunContext, rcfg: RunConfig, block: KTOConfig):
    examples, extra = file_examples(ctx, rcfg, "kto")
    return (unpair(walk_pairs(ctx, block.num_pairs)) if examples is None else examples), extra


def build(ctx: RunContext, rcfg: RunConfig, block: KTOConfig, data, rd, config_yaml: str) -> Job:
    examples, extra = data
    tok = ctx.tokenizer
    try:
        dataset = KTODataset.build_unpaired(examples, rcfg.model.seq_length, tok.pad_id, tok.eos_id,
                                            seed=rcfg.trainer.seed, add_eos=False)
    except ValueError as e:
        raise ConfigError(f"kto: {e}") from None
    n_d = int(dataset.desirable.sum())
    n_u = len(dataset) - n_d
    ratio = block.desirable_weight * n_d / max(block.undesirable_weight * n_u, 1e-9)
    if not 1.0 <= ratio <= 4 / 3:
        log.warning("kto: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = %.3f "
                    "(%d desirable, %d undesirable); the KTO paper recommends [1, 4/3]", ratio, n_d, n_u)
    summary = {"num_examples": len(dataset), **extra, "desirable": n_d, "undesirable": n_u}
    return preference_job(ctx, rcfg, "kto", block, dataset, rd, config_yaml, summary)
