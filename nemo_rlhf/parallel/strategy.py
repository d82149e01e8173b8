"""A Lightning strategy for megatron-core models.

torch.distributed and megatron's parallel_state are initialised before the Trainer exists (by
:func:`nemo_rlhf.parallel.init_distributed`, from torchrun / Slurm / a single process), so this
strategy never launches processes and never wraps the model in torch DDP: data parallelism is
megatron's DistributedDataParallel inside the LightningModule, and tensor/pipeline parallelism is
megatron's. Samplers are built by the module over the *data-parallel* rank (Lightning's
DistributedSampler would split over the world and hand TP peers different batches), hence
``use_distributed_sampler=False`` on the Trainer.
"""
from __future__ import annotations

import torch
from lightning_fabric.plugins.environments import ClusterEnvironment
from pytorch_lightning.strategies import DDPStrategy

from nemo_rlhf.parallel.distributed import LaunchEnv


class MegatronClusterEnvironment(ClusterEnvironment):
    """Ranks as read by :func:`nemo_rlhf.parallel.detect_launch_env` (processes already exist)."""

    def __init__(self, env: LaunchEnv):
        super().__init__()
        self.env = env

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self.env.master_addr

    @property
    def main_port(self) -> int:
        return self.env.master_port

    @staticmethod
    def detect() -> bool:
        return True

    def world_size(self) -> int:
        return self.env.world_size

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return self.env.rank

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return self.env.local_rank

    def node_rank(self) -> int:
        return self.env.rank // max(1, self.env.local_world_size)


class MegatronStrategy(DDPStrategy):
    strategy_name = "megatron"

    def __init__(self, env: LaunchEnv, backend: str):
        device = (lambda i: torch.device("cuda", i)) if torch.cuda.is_available() else (lambda i: torch.device("cpu"))
        super().__init__(
            cluster_environment=MegatronClusterEnvironment(env),
            parallel_devices=[device(i) for i in range(env.local_world_size)],
            process_group_backend=backend,
        )
        self.num_nodes = env.num_nodes

    def _configure_launcher(self) -> None:
        self._launcher = None  # torchrun / srun / the user started the processes

    def configure_ddp(self) -> None:
        pass  # megatron DistributedDataParallel already wraps the model chunks

    def model_to_device(self) -> None:
        pass  # megatron builds parameters on the right device; moving would detach grad buffers
