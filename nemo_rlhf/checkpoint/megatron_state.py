"""What megatron-core's optimizer and checkpoint writer need around a save or a load, on every
install (also without Apex / Transformer Engine, as on CPU) and from any caller (also a script
without a ``__main__`` guard)."""
from __future__ import annotations

from typing import Any, Dict

import torch


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def dp_reshardable(meta: Dict[str, Any], layout: Dict[str, Any], optimizer) -> bool:
    """Distributed-optimizer state (saved "dp_reshardable") loads when only the data-parallel size
    changed and the distributed optimizer is still on."""
    keep = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")
    return is_distributed(optimizer) and all((meta["layout"].get(k) or None) == (layout.get(k) or None) for k in keep)


def materialize_optimizer_state(optimizer) -> None:
    """megatron's DistributedOptimizer.state_dict() reads the inner optimizer's per-parameter state
    (its "step" when neither Apex nor Transformer Engine is installed, as on CPU); an optimizer that
    has not stepped yet has none, so loading a checkpoint into it failed (AssertionError). Give it
    megatron's own dummy state (one zero-gradient step), which the load then replaces."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def fork_results_queue() -> None:
    """megatron's file writer collects its writer processes' results through a queue served by a
    multiprocessing Manager it starts with the *spawn* method, which re-runs the ``__main__`` module:
    a user's script without an ``if __name__ == "__main__":`` guard (or a notebook cell) started
    itself again at the first checkpoint and died with an EOFError. Our saves are synchronous: the
    writer puts its results into that queue and reads them back with ``get_nowait()`` in this same
    process (its writer processes report through a queue of their own), so a thread-safe in-process
    queue does the job without starting any process. (A multiprocessing queue would not: its put
    goes through a feeder thread, and the immediate get_nowait() raced it, failing a save now and
    then with "results_queue should not be empty".)"""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def restore_adam_step(optimizer) -> None:
    """Without Apex / Transformer Engine, megatron's DistributedOptimizer keeps the checkpoint's Adam
    step in its param groups, but torch's Adam reads each parameter state's "step", which a load into
    a fresh optimizer left at the dummy state's value: the next update's bias correction then used
    the wrong step (a resumed run drifted from the uninterrupted one). Copy the group's step there."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = opt.optimizer.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)
