"""torch.distributed and megatron parallel_state set-up from torchrun, Slurm or a plain process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from nemo_rlhf.config.schema import ConfigError, ParallelConfig
from nemo_rlhf.logging import get_logger
from nemo_rlhf.parallel import cpu_compat

log = get_logger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _slurm_master_addr(env) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
    # "node[01-04,07]" -> "node01"; "a,b" -> "a". (scontrol show hostnames is not always present.)
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def detect_launch_env(environ=None) -> LaunchEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; an srun task per GPU sets SLURM_PROCID etc.;
    anything else is a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(rank=int(env["RANK"]), world_size=world,
                         local_rank=int(env.get("LOCAL_RANK", 0)),
                         local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                         master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    # An srun task has SLURM_STEP_ID; the batch script's own shell has SLURM_PROCID=0 and the
    # job's SLURM_NTASKS but no step: a process started there directly is a single process.
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and world > 1:
        per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
                    or env.get("SLURM_TASKS_PER_NODE") or str(world))
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(rank=int(env["SLURM_PROCID"]), world_size=world,
                         local_rank=int(env.get("SLURM_LOCALID", 0)),
                         local_world_size=int(per_node.split("(")[0].split(",")[0]),  # "4(x2)", "4,3"
                         master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(env),
                         master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)), launcher="slurm")
    return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                     master_port=int(env.get("MASTER_PORT", 0)) or _free_port(), launcher="single")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_on_loopback() -> None:
    """GLOO_SOCKET_IFNAME=<loopback interface> unless the user set it: every gloo group this process
    creates (megatron builds several) then listens on 127.0.0.1 only."""
    import socket

    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    names = [name for _, name in socket.if_nameindex()]
    loopback = next((n for n in ("lo", "lo0") if n in names), None)
    if loopback is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback


def validate_layout(parallel: ParallelConfig, world_size: int) -> int:
    """Check that TP * PP divides the world size; returns the data-parallel size."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size * "
            f"parallel.pipeline_model_parallel_size = {tp} * {pp} = {tp * pp}")
    return world_size // (tp * pp)


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise torch.distributed (idempotent). Applies the CPU compatibility layer first when
    CUDA is absent. A single process gets a 1-rank group, since megatron needs one."""
    cpu_compat.check_megatron_version()
    cpu_compat.apply()
    env = detect_launch_env()
    if dist.is_initialized():
        return env
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(minutes=timeout_minutes)
    if env.world_size == 1:
        # Nothing outside the process needs to reach it: an in-memory store (no TCP rendezvous
        # port) and gloo's pairs on the loopback interface (it would pick the host name's address).
        if backend == "gloo":
            _gloo_on_loopback()
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        # An explicit tcp:// address instead of MASTER_ADDR/PORT env vars: the rendezvous store
        # binds where the launcher's MASTER_ADDR / MASTER_PORT say (README: security notes).
        dist.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    log.debug("torch.distributed up: %s rank %d/%d backend %s", env.launcher, env.rank, env.world_size, backend)
    return env


def initialize_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> int:
    """(Re)build megatron's parallel_state for ``parallel`` and seed the model-parallel RNG.
    Returns the data-parallel size."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    dp = validate_layout(parallel, world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _destroy_groups(_MEGATRON_GROUPS)
    before = set(_process_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    _MEGATRON_GROUPS[:] = [g for g in _process_groups() if g not in before]
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dp


_MEGATRON_GROUPS: list = []
"""The process groups the last :func:`initialize_model_parallel` made. megatron's
``destroy_model_parallel`` only drops its references to them; torch keeps every group (and, with
gloo, two threads per group) until it is destroyed, so a process that re-initialises (tests,
benchmarks, sweeps) would pile up thousands of idle threads whose wake-ups take a core."""


def _process_groups() -> list:
    world = getattr(dist.distributed_c10d, "_world", None)
    return [g for g in getattr(world, "pg_map", {}) if g is not dist.GroupMember.WORLD]


def _destroy_groups(groups: list) -> None:
    live = set(_process_groups())
    for group in groups:
        if group in live:
            dist.destroy_process_group(group)
    groups.clear()


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _MEGATRON_GROUPS.clear()    # the default group's destruction below takes every group with it
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0, group: Optional[dist.ProcessGroup] = None):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
