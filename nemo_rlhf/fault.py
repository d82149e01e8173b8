"""Pre-emption-safe training: on SIGTERM or SIGUSR1, checkpoint at the next step boundary and exit.

Who sends what:
  - Slurm pre-emption, ``scancel`` and the end of a job: SIGTERM to every task, SIGKILL
    ``KillWait`` (or the partition's ``GraceTime``) seconds later.
  - ``#SBATCH --signal=B:USR1@120`` (launchers/multinode.sh): SIGUSR1 to the batch script 120 s
    before the time limit; the script forwards it to the tasks and requeues the job once they exit.
  - torchrun forwards SIGTERM to its workers (and SIGKILLs them 30 s later).

The handler only records the signal (nothing else is safe inside a handler: a collective there
could interleave with the training step's own). At every step boundary
(:func:`nemo_rlhf.modules.loop.end_of_step`) the ranks all-reduce "was a signal received" -- one
scalar per step, since a signal may reach only some ranks (a node's slurmstepd, one torchrun
agent) -- and if any rank got one, all of them write a checkpoint and raise :class:`Preempted`.

``Preempted`` is a ``SystemExit`` with code :data:`EXIT_PREEMPTED` = 75 (EX_TEMPFAIL in
sysexits.h: "temporary failure, try again"): Lightning and Hydra let it pass, the process group is
torn down, and the process exits 75 with no traceback. ``resume=auto`` continues from that
checkpoint with the same loss sequence as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from nemo_rlhf.logging import get_logger

log = get_logger(__name__)

STOP_SIGNALS: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75

_received: Optional[int] = None


class Preempted(SystemExit):
    """Raised on every rank after the on-signal checkpoint; exits the process with code 75."""

    def __init__(self, step: int, signum: int):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.signum = step, signum

    def __str__(self) -> str:
        return (f"stopped by {signal_name(self.signum)} after step {self.step} (checkpoint written; "
                f"exit code {EXIT_PREEMPTED}; resume=auto continues)")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _record(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    log.warning("received %s: will checkpoint and stop at the end of this step", signal_name(signum))


def install_signal_handlers(signals: Sequence[int] = STOP_SIGNALS) -> bool:
    """Route ``signals`` to the recorder (idempotent; False outside the main thread, where
    Python cannot set handlers). Called when training starts, after Lightning installed its own
    SIGTERM handler (which would stop without a checkpoint and broadcast from inside the handler)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in signals:
        signal.signal(s, _record)
    return True


@contextlib.contextmanager
def stop_at_step_boundary(signals: Sequence[int] = STOP_SIGNALS):
    """For the length of a run (``nemo_rlhf.train.run``): stop signals are recorded (and acted on
    at step boundaries); afterwards the previous handlers are restored and the record cleared, so
    a Python session that called ``nemo_rlhf.train(...)`` gets its own SIGTERM behaviour back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    clear()
    install_signal_handlers(signals)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        clear()


def received_signal() -> Optional[int]:
    """The first stop signal this process received (None if none)."""
    return _received


def clear() -> None:
    """Forget a received signal (a new run in the same process, tests)."""
    global _received
    _received = None


def agreed_stop_signal(group: Optional[dist.ProcessGroup] = None) -> Optional[int]:
    """Collective (every rank of ``group``, default the world, at the same point): the largest
    signal number any rank received, or None. One all-reduce of one integer."""
    local = _received or 0
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local or None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    flag = torch.tensor([local], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item()) or None
