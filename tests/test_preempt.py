"""The preemption flag: signals set it (and nothing else), handlers are restored, ICT stops without a checkpoint.
The end-to-end SIGUSR1 -> checkpoint -> --resume test is in test_resume.py (it shares the uninterrupted run)."""

import os
import signal
import time

import pytest

from realm_hpc import preempt
from realm_hpc.cli import main
from test_resume import COMMON


@pytest.mark.parametrize("signum", preempt.SIGNALS)
def test_signal_sets_the_flag_and_handlers_are_restored(signum):
    before = signal.getsignal(signum)
    with preempt.handlers():
        assert preempt.requested() is None
        os.kill(os.getpid(), signum)
        deadline = time.monotonic() + 5
        while preempt.requested() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert preempt.requested() == signum
    assert signal.getsignal(signum) is before


def test_preempted_during_ict_exits_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preempt, "requested", lambda: signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--out", str(tmp_path), "--steps", "4", *COMMON])
    assert exit_info.value.code == preempt.EXIT_PREEMPTED
    assert not (tmp_path / "checkpoint").exists()  # ICT state is not checkpointed: --resume redoes ICT
    assert (tmp_path / "config.json").exists()  # what the job scripts look for to add --resume
    err = capsys.readouterr().err
    assert "preempted by SIGTERM at step 0: no checkpoint" in err


def test_an_ignored_signal_stays_ignored():
    """`trap "" USR1` in the launching shell opts out of USR1 preemption; SIGTERM still preempts."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with preempt.handlers():
            assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGUSR1)
            assert preempt.requested() is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert preempt.requested() == signal.SIGTERM
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, old)
