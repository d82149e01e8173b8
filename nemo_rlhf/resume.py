"""Where a run starts: the resume policy of a run directory.

    resume=auto (default)  the latest complete checkpoint in <run dir>/checkpoints, if there is one
                           and it was saved for the same algorithm and model shape (else an error
                           naming the difference); a fresh start otherwise
    resume=never           a fresh start; in a new subdirectory ``restart-<time>`` when the run dir
                           already holds checkpoints, which stay untouched
    resume=<path>          that checkpoint; refused when the run dir holds later checkpoints that
                           this run would overwrite

Re-running a command on its run directory therefore continues the run, also with a raised
``trainer.max_steps`` (the learning-rate schedule then follows the new max_steps). A fresh start in a
directory that holds an old ``metrics.jsonl`` moves it aside instead of appending to it.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from nemo_rlhf.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.errors import CheckpointError
from nemo_rlhf.logging import get_logger

log = get_logger(__name__)

SHAPE_KEYS = (
    "algorithm.name", "model.arch", "model.num_layers", "model.encoder_num_layers", "model.hidden_size",
    "model.ffn_hidden_size", "model.num_attention_heads", "model.num_query_groups", "model.kv_channels",
    "model.position_embedding_type", "model.max_position_embeddings", "model.normalization",
    "model.activation", "model.add_bias_linear", "model.add_qkv_bias", "model.vocab_size",
    "model.make_vocab_size_divisible_by", "model.share_embeddings_and_output_weights",
    "model.relative_attention_num_buckets", "task.num_nodes", "ppo.critic",
)
"""Config keys a checkpoint must agree on to be continued (they decide which tensors it holds and
their shapes; task.num_nodes sets the randomwalks vocabulary)."""


@dataclass
class Start:
    run_dir: Path                  # where this run writes
    checkpoint: Optional[Path]     # continue from here; None: a fresh start
    run_id: str                    # the run's id: the checkpoint's, or a new one


def plan_start(rcfg: RunConfig, config_yaml: str, run_dir: Path) -> Start:
    """Rank 0 decides (the restart directory's name holds the time); every rank gets the same Start
    or the same error."""
    from nemo_rlhf.parallel import broadcast_object
    from nemo_rlhf.parallel.distributed import is_rank_zero

    decision = None
    if is_rank_zero():
        try:
            start = _plan(rcfg, config_yaml, run_dir)
            decision = (str(start.run_dir), start.checkpoint and str(start.checkpoint), start.run_id, None)
        except CheckpointError as e:
            decision = (None, None, None, str(e))
    run_dir_s, ckpt, run_id, error = broadcast_object(decision)
    if error is not None:
        raise CheckpointError(error)
    return Start(Path(run_dir_s), Path(ckpt) if ckpt else None, run_id)


def _plan(rcfg: RunConfig, config_yaml: str, run_dir: Path) -> Start:
    ckpt_dir = run_dir / "checkpoints"
    if rcfg.resume == "never":
        if list_checkpoints(ckpt_dir):
            fresh = run_dir / f"restart-{time.strftime('%Y%m%d-%H%M%S')}"
            log.info("resume=never: %s holds checkpoints (they stay); this run writes to %s", run_dir, fresh)
            run_dir = fresh
        return _fresh(run_dir)
    if rcfg.resume in (None, "auto"):
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", ckpt_dir)
            return _fresh(run_dir)
        check_fits(found, config_yaml)
        log.info("resume=auto: continuing from %s (resume=never starts afresh in a new subdirectory)", found)
        return Start(run_dir, found, _run_id(found))
    path = Path(rcfg.resume)
    if not path.exists():
        raise CheckpointError(f"resume={rcfg.resume}: no such checkpoint directory")
    check_fits(path, config_yaml)
    later = [p.name for p in list_checkpoints(ckpt_dir) if _step(p) > _step(path)]
    if later:
        raise CheckpointError(
            f"resume={rcfg.resume} is at step {_step(path)} but {ckpt_dir} holds later checkpoints "
            f"({', '.join(later)}) that this run would overwrite: continue from the latest (resume=auto) "
            f"or write this run elsewhere (another hydra.run.dir)")
    return Start(run_dir, path, _run_id(path))


def _fresh(run_dir: Path) -> Start:
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():   # an earlier run that never checkpointed: keep its history, apart
        aside = run_dir / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        metrics.rename(aside)
        log.info("fresh start: the earlier %s moved to %s", metrics.name, aside.name)
    return Start(run_dir, None, uuid.uuid4().hex[:12])


def _run_id(path: Path) -> str:
    return read_meta(path).get("run_id") or uuid.uuid4().hex[:12]


def _step(path: Path) -> int:
    return int(read_meta(path)["step"])


def differences(saved_yaml: Optional[str], config_yaml: str, keys=SHAPE_KEYS) -> List[str]:
    """``key: checkpoint X, now Y`` for each of ``keys`` whose value differs (a missing key is None)."""
    if not saved_yaml:
        return []
    saved, now = OmegaConf.create(saved_yaml), OmegaConf.create(config_yaml)
    out = []
    for key in keys:
        a, b = OmegaConf.select(saved, key, default=None), OmegaConf.select(now, key, default=None)
        if a != b:
            out.append(f"{key}: checkpoint {a}, now {b}")
    return out


def check_fits(path: Path, config_yaml: str) -> None:
    diff = differences(read_meta(path).get("config"), config_yaml)
    if diff:
        raise CheckpointError(
            f"the checkpoint {path} does not fit this config ({'; '.join(diff)}). To start afresh, "
            f"keeping it: resume=never (a new subdirectory of the run dir), or another hydra.run.dir")


def saved_value(path: Path, key: str):
    saved = read_meta(path).get("config")
    return OmegaConf.select(OmegaConf.create(saved), key, default=None) if saved else None
