"""The preemption watch: SIGTERM and SIGUSR1 are recorded, not fatal; handlers are restored afterwards."""

import os
import signal

import pytest

from megalign.checkpoint.preemption import PreemptionWatch


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_is_recorded_and_the_process_lives_on(sig):
    before = signal.getsignal(sig)
    with PreemptionWatch() as watch:
        assert not watch.agreed()
        os.kill(os.getpid(), sig)
        assert watch.agreed() and watch.signal_name == sig.name
    assert signal.getsignal(sig) == before
