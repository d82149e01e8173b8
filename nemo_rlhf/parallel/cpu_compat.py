"""Compatibility layer that lets megatron-core run on a CPU-only torch build with gloo.

megatron-core is written for CUDA: it allocates buffers with ``device=torch.cuda.current_device()``
(~175 places), has ~60 ``device="cuda"`` literals, a CUDA RNG tracker, explicit
``torch.cuda.synchronize()`` calls, and optimizer code that compares ``param.type()`` against
``'torch.cuda.FloatTensor'``. Each patch below removes one of those assumptions. Measured on
megatron-core 0.16.1 + torch 2.13.0 (CPU): with them, GPT/T5 forward/backward, TP (with and
without sequence parallel), PP (1F1B and interleaved), DP with megatron DDP and optimizer,
dist_checkpointing and KV-cached inference match the single-process result to ~1e-7.

``apply()`` is a no-op when CUDA is available, so GPU runs use megatron-core unmodified. It is
idempotent and must run before models or optimizers are built (``nemo_rlhf.parallel.initialize``
calls it).

Per megatron-core version (CI runs the suites on both stacks, ``make test``):
  0.16.1 (Python 3.11, the floor)  patches A-H below, each needed.
  0.19.2 (Python 3.12, what pip gives GPU users in NGC containers)  the same patches A-H, unchanged:
         the same ~175 current_device() buffers, device="cuda" literals, RNG tracker, param.type()
         checks, WrappedTorchNorm's sequence-parallel refusal and CUDA events / streams.
Another version gets a warning naming these (:func:`check_megatron_version`).
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

_APPLIED = False

# torch factory functions megatron calls with device="cuda" / device=<int>.
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "empty_like", "zeros_like", "ones_like",
              "full_like", "arange", "as_tensor", "randn", "rand", "randint")


TESTED_MEGATRON_CORE = ("0.16", "0.19")
"""megatron-core minor versions the test suite runs on (0.16.1 with Python 3.11, 0.19.2 with 3.12)."""
_WARNED = False


def check_megatron_version() -> None:
    """Warn once when the installed megatron-core is not a tested minor version."""
    global _WARNED
    from importlib.metadata import PackageNotFoundError, version

    if _WARNED:
        return
    try:
        installed = version("megatron-core")
    except PackageNotFoundError:
        return
    if ".".join(installed.split(".")[:2]) not in TESTED_MEGATRON_CORE:
        import warnings

        warnings.warn(f"megatron-core {installed} is not a version nemo_rlhf is tested with "
                      f"({', '.join(v + '.x' for v in TESTED_MEGATRON_CORE)}); the CPU compatibility layer and "
                      f"the checkpoint code patch / read its internals", stacklevel=2)
    _WARNED = True


def is_applied() -> bool:
    return _APPLIED


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, int) and not isinstance(dev, bool)


def _redirect_to_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA driver
        return fn(*args, **kwargs)
    return wrapper


class _CpuEvent:
    """Stands in for torch.cuda.Event: the inference controller times tokens with it."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **_):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return (other.t - self.t) * 1000.0


class _CpuStream:
    """Stands in for torch.cuda.Stream: DDP's grad sync waits on streams (a no-op on CPU)."""

    def __init__(self, *_, **__):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


def apply(force: bool = False) -> bool:
    """Patch torch/megatron for CPU execution. Returns True when the patches are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False

    # A) buffers allocated on torch.cuda.current_device()
    torch.cuda.current_device = lambda: torch.device("cpu")
    # B) explicit syncs in parallel_state, DDP, p2p communication and dist_checkpointing
    torch.cuda.synchronize = lambda *a, **k: None
    # C) the CUDA RNG tracker (model_parallel_cuda_manual_seed, get_cuda_rng_tracker().fork())
    #    runs on the CPU generator instead.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    import megatron.core.tensor_parallel.random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # D) hard-coded device="cuda" literals and .cuda() calls (default causal mask, optimizer
    #    scalars, clip_grads, schedules' token counts, dist_checkpointing exchange buffers)
    # `with torch.device("meta"):` recognises factories by identity in a cached set built on first
    # use; build it from the originals first, or it would hold our wrappers and create real tensors
    # (transformers' from_pretrained then left RoPE inv_freq buffers uninitialised: garbage logits).
    from torch.utils import _device as torch_device

    torch_device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _redirect_to_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    # E) the megatron optimizer and clip_grads check param.type() == 'torch.cuda.FloatTensor'
    original_type = torch.Tensor.type

    def _type(self, *args, **kwargs):
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch.") \
                and ".cuda." not in result:
            return "torch.cuda." + result[len("torch."):]
        return result

    torch.Tensor.type = _type
    # F) not CPU-specific: without Apex/TE the local spec's WrappedTorchNorm refuses sequence
    #    parallel. Allow it and tag the norm weights as FusedLayerNorm does, so
    #    finalize_model_grads all-reduces their grads over the TP group.
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def _new(cls, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = staticmethod(_new)
    # G/H) CUDA events and streams used for timing and grad-sync overlap
    torch.cuda.Event = _CpuEvent
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.default_stream = lambda device=None: _CpuStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    _APPLIED = True
    return True
