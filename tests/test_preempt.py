"""The preemption flag: signals set it (and nothing else), handlers are restored, ICT stops without a checkpoint.
The end-to-end SIGUSR1 -> checkpoint -> --resume test is in test_resume.py (it shares the uninterrupted run)."""

import json
import os
import signal
import time

import pytest
import torch

from realm_hpc import preempt
from realm_hpc.checkpoint import load_checkpoint
from realm_hpc.cli import main
from test_resume import COMMON


@pytest.fixture(autouse=True)
def sigint_not_ignored():
    """These tests send SIGINT to themselves; a shell that started pytest in the background (`cmd &` without job
    control) hands it SIGINT ignored, which preempt.handlers rightly leaves alone. Python's own handler for the test."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


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


def test_ctrl_c_checkpoints_at_the_next_step_boundary(tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback and wrote no checkpoint; it is now SIGTERM's request. The
    checkpoint lands at the end of the reader warm-up (3 steps), so the run also shows that the warm-up leaves the
    retriever where ICT left it: ICT's last gradient used to stay on it, and AdamW applied it at REALM's first step."""
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.train import Pretrainer

    real_batch, real_realm, after_ict = PretrainData.train_batch, Pretrainer.realm, {}

    def batch(self, step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while REALM step 2 runs
        return real_batch(self, step, *args)

    def realm(self, ckpt):
        after_ict.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return real_realm(self, ckpt)

    monkeypatch.setattr(PretrainData, "train_batch", batch)
    monkeypatch.setattr(Pretrainer, "realm", realm)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--out", str(run), "--steps", "6", *COMMON])
    err = capsys.readouterr().err
    assert exit_info.value.code == preempt.EXIT_PREEMPTED
    assert "received SIGINT: checkpointing at the next step boundary" in err
    ict_steps = 6
    assert f"preempted by SIGINT at step {ict_steps + 3}: checkpoint written; exit 75, continue with --resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    ckpt = load_checkpoint(run / "checkpoint")
    assert ckpt["run_state"]["step"] == 3  # step 2 finished, step 3 never began
    assert ckpt["run_state"]["step"] == json.loads((run / "config.json").read_text())["train"]["reader_warmup_steps"]
    retriever = [k for k in after_ict if k.startswith("retriever.")]
    assert retriever and all(torch.equal(ckpt["model"][k], after_ict[k]) for k in retriever)
    assert not all(torch.equal(ckpt["model"][k], v) for k, v in after_ict.items())  # the reader did train


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    from realm_hpc.train import Pretrainer

    def ict(self):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the user will not wait: KeyboardInterrupt from here

    monkeypatch.setattr(Pretrainer, "ict", ict)
    run = tmp_path / "new" / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--out", str(run), "--steps", "4", *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == preempt.EXIT_INTERRUPTED == 130
    assert err[-1].startswith("interrupted (a second Ctrl-C stops at once") and "Traceback" not in "".join(err)
    assert not (tmp_path / "new").exists()  # a start stopped before its first checkpoint leaves --out as found
