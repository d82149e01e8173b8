"""Checkpoints with megatron dist_checkpointing: model + optimizer + scheduler + loop state.

Layout of a run directory's checkpoints:

    checkpoints/step_0000100/      one complete checkpoint (dist_checkpointing files)
        nemo_rlhf_meta.json        step, parallel layout, config; written last
    checkpoints/latest             name of the newest complete checkpoint

Writes are atomic: everything goes to ``step_XXXXXXX.tmp`` and is renamed into place by rank 0
only after all ranks finished and the metadata is on disk, so a job killed mid-write leaves the
previous checkpoint usable (``.tmp`` leftovers are ignored and cleaned up by the next save).
A save that fails (disk full, I/O error) removes its ``.tmp`` and raises a
:class:`~nemo_rlhf.errors.RunDirectoryError` naming the path, the space a checkpoint needs and the
last complete checkpoint.

Every checkpoint records the ``run_id`` of the run that wrote it (a run and its resumptions share
one id). Rotation (``keep_last``) deletes only checkpoints of the saving run, and a save never
replaces another run's checkpoint: nothing a run did not write is ever deleted.
Model weights reshard on load (a TP=2 checkpoint loads at TP=1 and vice versa; PP likewise);
optimizer state reloads when the layout matches, or when the plain (non-distributed) optimizer
was used, whose state reshards like the weights.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from nemo_rlhf.checkpoint.megatron_state import (dp_reshardable, fork_results_queue, is_distributed,
                                                  materialize_optimizer_state, restore_adam_step)
from nemo_rlhf.errors import CheckpointError, RunDirectoryError  # noqa: F401  (CheckpointError re-exported)
from nemo_rlhf.logging import get_logger
from nemo_rlhf.models.gpt import unwrap

log = get_logger(__name__)

META_FILE = "nemo_rlhf_meta.json"
LATEST_FILE = "latest"
_DIST_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def current_layout() -> Dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _model_sharded_state_dict(chunks: List[torch.nn.Module], name: str = "model") -> Dict[str, Any]:
    """``name`` prefixes the sharded keys too, so two models (policy, critic) can share a checkpoint."""
    prefix = "" if name == "model" else f"{name}."
    if len(chunks) == 1:
        return {name: unwrap(chunks[0]).sharded_state_dict(prefix=prefix)}
    # interleaved pipeline: one entry per virtual stage, as Megatron-LM does
    return {f"{name}{i}": unwrap(c).sharded_state_dict(prefix=prefix) for i, c in enumerate(chunks)}


def _rng_sharded_object(layout: Dict[str, Any]):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    shape = (layout["pipeline_model_parallel_size"], layout["tensor_model_parallel_size"],
             layout["data_parallel_size"])
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _restore_rng(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _checkpointable(optimizer) -> bool:
    """megatron-core 0.16 builds optimizer checkpoints through init_state_fn, which only Adam has."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return all(getattr(o, "init_state_fn", None) is not None for o in inner)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def save_checkpoint(root: str | os.PathLike, step: int, chunks: List[torch.nn.Module], optimizer=None,
                    scheduler=None, loop_state: Optional[Dict[str, Any]] = None,
                    config_yaml: Optional[str] = None, keep_last: Optional[int] = None,
                    extra: Optional[Dict[str, tuple]] = None, run_id: Optional[str] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``extra`` maps a
    name (e.g. "critic") to (chunks, optimizer, scheduler) of another model saved alongside.
    ``run_id``: the saving run's id (rotation deletes only its checkpoints)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = _step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    owner = _run_id_of(final) if (final / META_FILE).is_file() else run_id
    if owner != run_id:
        raise CheckpointError(f"{final} was written by another run (run_id {owner}); not replacing it: "
                              f"use another hydra.run.dir")
    _guard_io(root, step, tmp, lambda: _rank() == 0 and _fresh_dir(tmp))
    layout = current_layout()
    state = _model_sharded_state_dict(chunks)
    if optimizer is not None and not _checkpointable(optimizer):
        log.warning("megatron-core cannot checkpoint the state of this optimizer (%s): saving weights only",
                    type(optimizer).__name__)
        optimizer = None
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            {k: v for k, v in state.items()}, metadata=_DIST_OPT_META)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    for name, (x_chunks, x_opt, x_sched) in (extra or {}).items():
        x_state = _model_sharded_state_dict(x_chunks, name)
        state.update(x_state)
        if x_opt is not None:
            state[f"{name}_optimizer"] = x_opt.sharded_state_dict(dict(x_state), metadata=_DIST_OPT_META)
        if x_sched is not None:
            state[f"{name}_scheduler"] = x_sched.state_dict()
    state["loop_state"] = dict(loop_state or {}, step=step)
    state["rng_state"] = _rng_sharded_object(layout)
    meta = {"step": step, "run_id": run_id, "layout": layout, "has_optimizer": optimizer is not None,
            "use_distributed_optimizer": bool(getattr(getattr(optimizer, "config", None),
                                                      "use_distributed_optimizer", False)),
            "models": ["model", *(extra or {})], "loop_state": state["loop_state"], "config": config_yaml}
    fork_results_queue()
    _guard_io(root, step, tmp, lambda: dist_checkpointing.save(state, str(tmp)))
    _guard_io(root, step, tmp, lambda: _rank() == 0 and _publish(root, tmp, final, meta))
    if _rank() == 0:
        if keep_last:
            mine = [p for p in list_checkpoints(root) if _run_id_of(p) == run_id]
            for old in mine[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    log.info("saved checkpoint %s", final)
    return final


def _fresh_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()


def _publish(root: Path, tmp: Path, final: Path, meta: Dict[str, Any]) -> None:
    """Rank 0, after every rank wrote its shards: metadata last, then the atomic rename."""
    with open(tmp / META_FILE, "w") as f:
        json.dump(meta, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step of this run (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(root, final.name)


def _run_id_of(path: Path) -> Optional[str]:
    try:
        return read_meta(path).get("run_id")
    except (OSError, ValueError, CheckpointError):
        return None


def _guard_io(root: Path, step: int, tmp: Path, write) -> None:
    """Collective: run ``write``; if it failed on any rank, remove ``tmp`` and raise a
    RunDirectoryError on every rank, saying what was lost and what is kept."""
    try:
        write()
        error = None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036  torch's CheckpointException is a BaseException; it wraps
        error = e               # the writer's failure ("Worker failure: [Errno 28] ...", "unexpected pos")
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failures = [e for e in errors if e is not None]
    if not failures:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise RunDirectoryError(_save_failure(root, step, tmp, failures[0])) from error


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _save_failure(root: Path, step: int, tmp: Path, error) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    # the last line is the cause (torch's CheckpointException carries each rank's traceback)
    text = " ".join(([ln for ln in text.splitlines() if ln.strip()] or [""])[-1].split())
    last = latest_checkpoint(root)
    need = _dir_bytes(last) if last is not None else None
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    # a full disk shows as ENOSPC, or (through torch's zip writer) as "unexpected pos": judge by the space left
    full = "Errno 28" in text or "No space left" in text or (
        free is not None and need is not None and free < need)
    what = "the disk is full" if full else "an I/O error"
    sizes = (f"a checkpoint of this run takes about {need / 2**20:.1f} MiB ({last.name}); " if need else "") + (
        f"{free / 2**20:.1f} MiB are free there" if free is not None else "the free space there is unknown")
    kept = (f"the last complete checkpoint is {last} (step {int(last.name.split('_')[1])}; resume=auto "
            f"continues from it)" if last is not None else "no complete checkpoint was written before")
    return (f"could not write the step-{step} checkpoint to {tmp} ({what}: {text[:300]}); {sizes}; the "
            f"partial directory was removed; {kept}; metrics.jsonl keeps the steps run so far")


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST_FILE + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def list_checkpoints(root: str | os.PathLike) -> List[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
             and not p.name.endswith(".tmp") and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_meta(path: str | os.PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete nemo_rlhf checkpoint (no {META_FILE}; "
                              f"an interrupted write leaves a .tmp directory, which is never loaded)")
    with open(path / META_FILE) as f:
        return json.load(f)


def load_checkpoint(path: str | os.PathLike, chunks: List[torch.nn.Module], optimizer=None, scheduler=None,
                    load_rng: bool = True, extra: Optional[Dict[str, tuple]] = None) -> Dict[str, Any]:
    """Collective. Loads weights (resharding to the current layout), and optimizer, scheduler and
    RNG state when given and compatible. Returns the saved loop state (``step`` included)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = read_meta(path)
    layout = current_layout()
    same_layout = meta["layout"] == layout
    saved_vpp = meta["layout"].get("virtual_pipeline_model_parallel_size")
    if (saved_vpp or None) != (layout["virtual_pipeline_model_parallel_size"] or None):
        raise CheckpointError(
            f"checkpoint {path} was saved with virtual_pipeline_model_parallel_size={saved_vpp}; "
            f"load it with the same value (now {layout['virtual_pipeline_model_parallel_size']})")
    state = _model_sharded_state_dict(chunks)
    load_opt = optimizer is not None and meta.get("has_optimizer")
    if load_opt and meta.get("use_distributed_optimizer") and not dp_reshardable(meta, layout, optimizer):
        log.warning("checkpoint %s has distributed-optimizer state for layout %s; the layout is now %s (and %s "
                    "distributed optimizer): loading weights only (optimizer state starts fresh); the state "
                    "reshards across data-parallel sizes with the same TP / PP and the distributed optimizer on",
                    path, meta["layout"], layout, "a" if is_distributed(optimizer) else "no")
        load_opt = False
    if load_opt:
        materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            {k: v for k, v in state.items()}, is_loading=True, metadata=_DIST_OPT_META)
    extra = extra or {}
    missing = [name for name in extra if name not in meta.get("models", ["model"])]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} model (it holds {meta.get('models')})")
    for name, (x_chunks, x_opt, _) in extra.items():
        x_state = _model_sharded_state_dict(x_chunks, name)
        state.update(x_state)
        if load_opt and x_opt is not None:
            materialize_optimizer_state(x_opt)
            state[f"{name}_optimizer"] = x_opt.sharded_state_dict(dict(x_state), is_loading=True,
                                                                 metadata=_DIST_OPT_META)
    rng = load_rng and same_layout
    if rng:
        state["rng_state"] = _rng_sharded_object(layout)
    loaded = dist_checkpointing.load(state, str(path))
    models = [("model", chunks, optimizer, scheduler), *((n, *v) for n, v in extra.items())]
    for name, m_chunks, m_opt, m_sched in models:
        for i, chunk in enumerate(m_chunks):
            key = name if len(m_chunks) == 1 else f"{name}{i}"
            sd = loaded[key]
            if name != "model":
                sd = {k[len(name) + 1:] if k.startswith(name + ".") else k: v for k, v in sd.items()}
            unwrap(chunk).load_state_dict(sd, strict=True)
        opt_key = "optimizer" if name == "model" else f"{name}_optimizer"
        if load_opt and m_opt is not None and opt_key in loaded:
            with torch.no_grad():  # the fp32 distributed optimizer copies into leaf params
                m_opt.load_state_dict(loaded[opt_key])
            restore_adam_step(m_opt)
        sched_key = "scheduler" if name == "model" else f"{name}_scheduler"
        if m_sched is not None and sched_key in loaded:
            m_sched.load_state_dict(loaded[sched_key])
    if rng:
        _restore_rng(loaded["rng_state"])
    log.info("loaded checkpoint %s (step %d%s)", path, meta["step"],
             "" if same_layout else f", resharded from {meta['layout']}")
    return dict(loaded.get("loop_state", meta.get("loop_state", {})))


def load_own_weights(path: str | os.PathLike, chunks: List[torch.nn.Module], skip_prefixes=("value_head.",)) -> None:
    """Initialise ``chunks`` from the policy weights of a nemo_rlhf checkpoint (any layout). Parameters
    under ``skip_prefixes`` (heads the checkpoint does not have, e.g. a fresh value head) keep
    their initialisation; anything else missing is an error. Only our own format: for a
    ``model.path`` that may be a Hugging Face directory, a ``.nemo`` file or a NeMo 2 / Megatron
    checkpoint, call :func:`nemo_rlhf.weights.load_weights`, which dispatches on the format."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    read_meta(path)
    state = _model_sharded_state_dict(chunks)
    for key in list(state):
        state[key] = {k: v for k, v in state[key].items() if not k.startswith(skip_prefixes)}
    available = set(dist_checkpointing.load_tensors_metadata(str(path)))
    wanted = {sh.key for sd in state.values() for sh in sd.values() if hasattr(sh, "key")}
    absent = sorted(k for k in wanted - available if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {absent}")
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        result = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        bad = [k for k in result.missing_keys if not k.startswith(skip_prefixes) and not k.endswith("_extra_state")]
        if bad or result.unexpected_keys:
            raise CheckpointError(f"checkpoint {path} does not match the model: missing {bad}, "
                                  f"unexpected {result.unexpected_keys}")
    log.info("initialised weights from %s", path)
