"""nemo_rlhf.fault: the signal recorder and the stop exception (single process; the multi-rank
agreement and real runs are in tests/e2e/test_fault_tolerance.py and tests/slurm)."""
import os
import signal

import pytest

from nemo_rlhf import fault


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in fault.STOP_SIGNALS}
    fault.clear()
    yield
    fault.clear()
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_recorded_not_acted_on(handlers, sig):
    assert fault.install_signal_handlers()
    assert fault.received_signal() is None and fault.agreed_stop_signal() is None
    os.kill(os.getpid(), sig)           # delivered before the next bytecode; the process lives on
    assert fault.received_signal() == sig
    assert fault.agreed_stop_signal() == sig    # no process group: this rank's own signal
    os.kill(os.getpid(), signal.SIGTERM if sig == signal.SIGUSR1 else signal.SIGUSR1)
    assert fault.received_signal() == sig       # the first one is kept
    fault.clear()
    assert fault.agreed_stop_signal() is None


def test_preempted_exits_75_and_says_how_to_continue():
    e = fault.Preempted(step=42, signum=signal.SIGTERM)
    assert isinstance(e, SystemExit) and e.code == fault.EXIT_PREEMPTED == 75
    assert str(e) == ("stopped by SIGTERM after step 42 (checkpoint written; exit code 75; "
                      "resume=auto continues)")
    assert fault.signal_name(12345) == "signal 12345"


def test_a_run_restores_the_callers_handlers(handlers):
    """nemo_rlhf.train from a Python session: inside the run a SIGTERM is recorded; afterwards the
    session's own handler is back and nothing is left recorded."""
    seen = []
    mine = lambda signum, frame: seen.append(signum)
    signal.signal(signal.SIGTERM, mine)
    with fault.stop_at_step_boundary():
        os.kill(os.getpid(), signal.SIGTERM)
        assert fault.received_signal() == signal.SIGTERM and seen == []
    assert signal.getsignal(signal.SIGTERM) is mine and fault.received_signal() is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]
