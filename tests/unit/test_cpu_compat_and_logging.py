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


def test_megatron_rng_tracker_forks_its_own_seeded_stream_on_cpu(mp):
    """The model-parallel RNG tracker (dropout inside TP regions) runs on the CPU generator: a fork
    draws from its own seeded stream, which advances, and leaves the default stream untouched."""
    from megatron.core import tensor_parallel

    def draws():
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before)          # the default stream untouched
        with tracker.fork():
            b = torch.rand(3)
        return a, b

    a1, b1 = draws()
    a2, b2 = draws()
    assert torch.equal(a1, a2) and torch.equal(b1, b2)             # seeded: reproducible
    assert not torch.equal(a1, b1)                                 # the forked stream advances
    torch.manual_seed(123)
    assert not torch.equal(torch.rand(3), a1)                      # its own stream, not the default one


def test_verbosity_env_and_api(monkeypatch):
    logger = nlog.get_logger("x")
    nlog.set_verbosity("WARNING")
    assert nlog.get_verbosity() == logging.WARNING
    assert logging.getLogger("megatron").level == logging.WARNING
    nlog.set_verbosity(logging.DEBUG)
    assert logger.getEffectiveLevel() == logging.DEBUG
    nlog.set_verbosity("INFO")
