"""DPO-family recipe (algorithm=dpo): DPO and its variants (``dpo.loss_type``: one row each of the
loss table in nemo_rlhf/algorithms/dpo.py) on preference pairs from data.train_file or built from
the task's walks, against a reference policy (precomputed log-probs or a frozen model); SimPO and
ORPO are reference-free. KTO (recipes/kto.py) builds its job with :func:`preference_job`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from nemo_rlhf.algorithms.dpo import DPO_LOSS_TYPES
from nemo_rlhf.config.checks import _positive, _require
from nemo_rlhf.config.schema import RunConfig, SFTWarmupConfig
from nemo_rlhf.data.preference import PreferenceDataset
from nemo_rlhf.errors import CheckpointError, ConfigError
from nemo_rlhf.modules.dpo import DPOModule, needs_reference
from nemo_rlhf.recipes.common import Job, RunContext, file_examples, walk_pairs


@dataclass
class DPOConfig:
    """DPO and its family (``dpo:`` block) on preference pairs."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    """sigmoid | ipo | hinge | robust (DPO variants, nemo_rlhf.algorithms.dpo.DPO_LOSSES) |
    simpo | orpo | cpo (reference-free: no reference pass or model)"""
    simpo_gamma: float = 0.5
    """SimPO target margin gamma (SimPO uses length-normalised log-probs)."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term next to the chosen completion's NLL."""
    cpo_alpha: float = 1.0
    """CPO weight of the chosen completion's NLL (behaviour cloning) next to the preference term."""
    label_smoothing: float = 0.0
    """Conservative DPO / robust DPO label-noise rate."""
    length_normalize: bool = False
    """Use mean instead of summed token log-probs (IPO's option)."""
    reference: str = "precomputed"
    """precomputed (one pass with the initial policy before training, saved with the run) | model
    (a frozen copy in memory)"""
    num_pairs: int = 4000
    """Pairs built from the task's walks (two walks from one start, the more optimal one chosen)."""
    sft_warmup: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)
    """When model.path is null: SFT warm-up before DPO (the reference is that SFT policy)."""

    def __post_init__(self):
        _require(self.loss_type in DPO_LOSS_TYPES,
                 f"dpo.loss_type must be {'|'.join(DPO_LOSS_TYPES)}, got {self.loss_type!r}")
        _require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        _require(0 <= self.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.reference in ("precomputed", "model"),
                 f"dpo.reference must be precomputed|model, got {self.reference!r}")
        _positive(self.num_pairs, "dpo.num_pairs")




Config = DPOConfig


def layout_problem(rcfg: RunConfig) -> Optional[str]:
    """DPO / KTO (``rcfg.algorithm.name``): a frozen reference model runs inside each micro-batch's
    forward, which across pipeline stages would need its own schedule; the precomputed reference
    (the default) runs across them."""
    name = rcfg.algorithm.name
    block = getattr(rcfg, name)
    if rcfg.parallel.pipeline_model_parallel_size > 1 and block.reference == "model" and needs_reference(block):
        return (f"{name}.reference=model needs parallel.pipeline_model_parallel_size=1 (the frozen reference runs "
                f"inside each micro-batch's forward): use {name}.reference=precomputed")
    return None


def prepare(ctx: RunContext, rcfg: RunConfig, block: DPOConfig):
    pairs, extra = file_examples(ctx, rcfg, "preference")
    return (walk_pairs(ctx, block.num_pairs) if pairs is None else pairs), extra


def build(ctx: RunContext, rcfg: RunConfig, block: DPOConfig, data, rd, config_yaml: str) -> Job:
    pairs, extra = data
    tok = ctx.tokenizer
    try:
        dataset = PreferenceDataset.build(pairs, rcfg.model.seq_length, tok.pad_id, tok.eos_id, add_eos=False)
    except ValueError as e:
        raise ConfigError(f"dpo: {e}") from None
    return preference_job(ctx, rcfg, "dpo", block, dataset, rd, config_yaml, {"num_pairs": len(dataset), **extra})


def preference_job(ctx: RunContext, rcfg: RunConfig, algorithm: str, block, dataset, rd, config_yaml: str,
                   summary) -> Job:
    """The DPOModule job shared by DPO and KTO: reference log-probs precomputed at the start (and
    saved as reference_logps.pt, restored on resume) or a frozen reference model in the checkpoint."""
    module = DPOModule(rcfg, dataset, ctx.tokenizer.vocab_size, rd, ctx.evaluate_fn, ctx.dp_rank, ctx.dp_size,
                       config_yaml=config_yaml, algo_cfg=block, algorithm=algorithm)
    precomputed = block.reference == "precomputed" and needs_reference(block)

    def after_start():
        if precomputed:   # with the initial policy, before any update
            module.precompute_reference()

    def after_resume(loop, rd):
        if precomputed:
            ref_file = rd.path / "reference_logps.pt"
            if not ref_file.is_file():
                raise CheckpointError(f"resume: {ref_file} (the precomputed reference log-probs) is missing")
            dataset.ref_logps.copy_(torch.load(ref_file))

    extra = {"reference": ([module.reference], None, None)} if module.reference is not None else None
    return Job(module, load_initial=module.init_from, extra_engines=extra, after_start=after_start,
               after_resume=after_resume, summary=summary)
