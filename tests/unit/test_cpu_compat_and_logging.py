import logging

import torch

from nemo_rlhf import logging as nlog
from nemo_rlhf.parallel import cpu_compat


def test_cpu_layer_active_without_cuda(dist1):
    assert not torch.cuda.is_available()
    assert cpu_compat.is_applied()
    assert cpu_compat.apply() is True                       # idempotent
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.arange(3, device=torch.device("cuda")).device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"     # what megatron's optimizer checks
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_megatron_rng_tracker_runs_on_cpu(mp):
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    assert a.shape == (3,)


def test_verbosity_env_and_api(monkeypatch):
    logger = nlog.get_logger("x")
    nlog.set_verbosity("WARNING")
    assert nlog.get_verbosity() == logging.WARNING
    assert logging.getLogger("megatron").level == logging.WARNING
    nlog.set_verbosity(logging.DEBUG)
    assert logger.getEffectiveLevel() == logging.DEBUG
    nlog.set_verbosity("INFO")
