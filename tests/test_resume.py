"""Checkpoint/resume equality with inline refresh: a run stopped at step S (by --steps, preempted by SIGUSR1, or killed
after any kind of checkpoint it writes) and resumed to N logs the same per-step losses after S as an uninterrupted run
to N, and ends with the same weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from realm_hpc.checkpoint import load_checkpoint
from realm_hpc.cli import main
from realm_hpc.metrics import read_metrics
from realm_hpc.preempt import EXIT_PREEMPTED

N, S = 12, 6
COMMON = ["--recipe", "tiny",
          "--set", "train.log_every=1", "--set", "refresh.every=4", "--set", "ict.steps=6", "--set", "ict.eval_every=6",
          "--set", "train.reader_warmup_steps=3", "--set", "train.eval_every=1000",
          "--set", "train.checkpoint_every=1000",
          "--set", "data.world_people=60", "--set", "data.world_orgs=12", "--set", "data.world_cities=8",
          "--set", "data.world_surnames=10", "--set", "data.heldout_facts=20", "--set", "data.eval_examples=20"]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _versions(run_dir) -> dict[int, int]:
    return {r["step"]: r["index_version"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    a, b = root / "a", root / "b"
    main(["pretrain", "--out", str(a), "--steps", str(N), *COMMON])
    main(["pretrain", "--out", str(b), "--steps", str(S), *COMMON])
    b_first = _losses(b)
    # The resumed run takes its config from b/config.json; only the step count changes.
    main(["pretrain", "--out", str(b), "--resume", "--steps", str(N)])
    return a, b, b_first


def test_resumed_losses_equal_the_uninterrupted_run(runs):
    a, b, b_first = runs
    la, lb = _losses(a), _losses(b)
    ict_steps = json.loads((a / "summary.json").read_text())["ict_steps"]
    assert ict_steps == 6
    assert sorted(la) == [ict_steps + s for s in range(1, N + 1)]
    assert sorted(lb) == sorted(la)  # every step logged once: nothing lost, nothing doubled by the resume
    resume_at = ict_steps + S
    assert max(b_first) == resume_at
    after = [s for s in la if s > resume_at]
    assert len(after) == N - S
    for s in sorted(la):
        assert lb[s] == pytest.approx(la[s], abs=1e-5), f"step {s}: resumed {lb[s]} vs uninterrupted {la[s]}"
    assert _versions(b) == _versions(a)
    # The refresh at step 8 happens after the resume: the index was carried through the checkpoint.
    assert max(_versions(a).values()) == 1 + (N - 1) // 4


def test_resumed_run_ends_with_the_same_weights_and_summary(runs):
    a, b, _ = runs
    wa = load_checkpoint(a / "checkpoint")
    wb = load_checkpoint(b / "checkpoint")
    assert wa["run_state"]["step"] == wb["run_state"]["step"] == N
    for name, ta in wa["model"].items():
        torch.testing.assert_close(wb["model"][name], ta, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(wb["index"]["embeddings"], wa["index"]["embeddings"], atol=1e-5, rtol=1e-5)
    assert wb["index"]["version"] == wa["index"]["version"]
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    for key in ("steps", "ict_steps", "index_versions", "max_staleness_steps", "test_recall_at_8_start",
                "dev_recall_at_8_after_ict", "test_recall_at_8", "test_mlm_acc_retrieval", "dev_recall_at_8",
                "dev_mlm_acc_retrieval"):
        assert sb[key] == pytest.approx(sa[key], abs=1e-6), key


# -- preemption: SIGUSR1 -> checkpoint at the next step boundary, exit EXIT_PREEMPTED, --resume continues ---------
def _wait_for_first_realm_row(run_dir, proc, timeout_s=180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"pretraining exited ({proc.returncode}) before it was signalled:\n{proc.stderr.read()}")
        if (run_dir / "metrics.jsonl").exists() and _losses(run_dir):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no REALM step logged within {timeout_s} s")


@pytest.fixture(scope="module")
def preempted(runs, tmp_path_factory):
    """A run to N signalled (SIGUSR1, from outside, as Slurm does) right after its first REALM step, then resumed."""
    c = tmp_path_factory.mktemp("preempt") / "c"
    proc = subprocess.Popen([sys.executable, "-m", "realm_hpc", "pretrain", "--out", str(c), "--steps", str(N),
                             *COMMON], env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_first_realm_row(c, proc)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=180)
    stopped = {"returncode": proc.returncode, "stderr": stderr, "losses": _losses(c),
               "checkpoint": load_checkpoint(c / "checkpoint")["run_state"]}
    main(["pretrain", "--out", str(c), "--resume"])
    return runs[0], c, stopped


def test_signal_checkpoints_at_the_next_step_boundary_and_exits_preempted(preempted):
    _, _, stopped = preempted
    assert stopped["returncode"] == EXIT_PREEMPTED, stopped["stderr"][-2000:]
    last_logged = max(stopped["losses"])
    ict_steps = 6
    # The checkpoint holds exactly the logged steps: the step in flight finished, no later step ran.
    assert stopped["checkpoint"]["step"] == last_logged - ict_steps
    assert 1 <= stopped["checkpoint"]["step"] < N
    assert f"preempted by SIGUSR1 at step {last_logged}: checkpoint written" in stopped["stderr"]


def test_resume_after_preemption_gives_the_uninterrupted_losses(preempted):
    a, c, stopped = preempted
    la, lc = _losses(a), _losses(c)
    assert sorted(lc) == sorted(la)  # every step logged once
    assert any(s > max(stopped["losses"]) for s in lc)
    for s in sorted(la):
        assert lc[s] == pytest.approx(la[s], abs=1e-5), f"step {s}: resumed {lc[s]} vs uninterrupted {la[s]}"
    assert _versions(c) == _versions(a)
    assert load_checkpoint(c / "checkpoint")["run_state"]["step"] == N


# -- every kind of checkpoint a run writes: end of ICT (kill -9), periodic (a crash), end of ICT with ICT off; the final
# one (runs: --steps S, then --resume --steps N) and a preemption's (preempted) are above --------------------------
class _Killed(BaseException):
    """A process death between two step boundaries (nothing after it runs, nothing is cleaned up)."""


def _killed_at(monkeypatch, step: int) -> None:
    from realm_hpc.data.examples import PretrainData

    real = PretrainData.train_batch

    def batch(self, s, *args):
        if s == step:
            raise _Killed(f"killed during REALM step {s}")
        return real(self, s, *args)

    monkeypatch.setattr(PretrainData, "train_batch", batch)


def _assert_same_losses(uninterrupted, resumed) -> None:
    la, lr = _losses(uninterrupted), _losses(resumed)
    assert sorted(lr) == sorted(la)  # every step logged once
    for s in sorted(la):
        assert lr[s] == la[s], f"step {s}: resumed {lr[s]} vs uninterrupted {la[s]}"  # bit for bit
    assert _versions(resumed) == _versions(uninterrupted)


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    """One run through two kinds of checkpoint: kill -9 right after the end-of-ICT checkpoint appears (the issue's
    case), --resume; killed again between the periodic checkpoint at step 3 (the end of the reader warm-up) and the
    next one, --resume to the end. Returns the run and both checkpoints as they were resumed from."""
    d = tmp_path_factory.mktemp("chained") / "d"
    proc = subprocess.Popen([sys.executable, "-m", "realm_hpc", "pretrain", "--out", str(d), "--steps", str(N),
                             *COMMON, "--set", "train.checkpoint_every=3"], env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (d / "checkpoint" / "state.pt").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no end-of-ICT checkpoint (exit {proc.returncode}):\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    end_of_ict = load_checkpoint(d / "checkpoint")
    with pytest.MonkeyPatch.context() as mp:
        _killed_at(mp, 4)
        with pytest.raises(_Killed):
            main(["pretrain", "--out", str(d), "--resume"])
    periodic = load_checkpoint(d / "checkpoint")
    main(["pretrain", "--out", str(d), "--resume"])
    return d, end_of_ict, periodic


def test_resume_from_the_end_of_ict_and_a_periodic_checkpoint_gives_the_uninterrupted_losses(runs, chained):
    a = runs[0]
    d, end_of_ict, periodic = chained
    assert end_of_ict["run_state"]["step"] == 0 and end_of_ict["run_state"]["ict_done"]
    assert end_of_ict["index"] is None and periodic["run_state"]["step"] == 3
    _assert_same_losses(a, d)
    wa, wd = load_checkpoint(a / "checkpoint"), load_checkpoint(d / "checkpoint")
    for name, ta in wa["model"].items():
        assert torch.equal(wd["model"][name], ta), name


def test_resume_from_the_end_of_ict_checkpoint_with_ict_off(tmp_path, monkeypatch):
    """With ict.steps=0 REALM starts from the index of the untrained encoders, built for recall at start: the
    end-of-ICT checkpoint carries it."""
    from realm_hpc.train import Pretrainer

    off = [*COMMON, "--set", "ict.steps=0", "--steps", "5"]
    main(["pretrain", "--out", str(tmp_path / "a"), *off])
    real = Pretrainer.realm

    def killed(self, ckpt):
        raise _Killed("killed right after the end-of-ICT checkpoint")

    monkeypatch.setattr(Pretrainer, "realm", killed)
    with pytest.raises(_Killed):
        main(["pretrain", "--out", str(tmp_path / "b"), *off])
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert ckpt["run_state"]["step"] == 0 and ckpt["index"] is not None and ckpt["index"]["weights_step"] == 0
    monkeypatch.setattr(Pretrainer, "realm", real)
    main(["pretrain", "--out", str(tmp_path / "b"), "--resume"])
    _assert_same_losses(tmp_path / "a", tmp_path / "b")
