"""A refresher rank that dies does not stop training: trainers keep the last index, staleness grows and is logged,
and a replacement refresher spawned by the trainers brings index refreshes back.

mpich's hydra kills every rank when one dies by a signal; `-disable-auto-cleanup` plus a shell that turns the kill
into an exit status (../shared/FACTS.md) keeps the trainers alive. The trainers notice by a timeout
(`refresh.timeout_s`): mpich reports no error for a dead rank. They then MPI_Comm_spawn a new refresher.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_scale import MPIEXEC, REALM, SMALL, TIMEOUT_S, _env, _rows_if_any

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(c) for c in (task / "children").read_text().split()]
                out += kids
                todo += kids
        except FileNotFoundError:
            continue
    return out


def _world_rank(pid: int, var: str = "PMI_RANK") -> int | None:
    """The MPI world rank of a realm_hpc process of ours, from the launcher's variable in its environment."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, PermissionError):
        return None
    if b"realm_hpc" not in cmd or not cmd.startswith(sys.executable.encode()):
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(f"{var}=".encode())]
    return int(ranks[0]) if ranks else None


def run_and_kill_refresher(argv: list, cwd: Path, env: dict, out: Path, is_refresher) -> tuple[int, str]:
    """Launch `argv`; once the run in `out` has index version 2, SIGKILL the one process among the launcher's
    descendants that `is_refresher(pid)` picks, and let the rest finish. Returns (exit status, stdout + stderr)."""
    launcher = subprocess.Popen([str(c) for c in argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while not any(r["index_version"] >= 2 for r in _rows_if_any(out)):
            assert launcher.poll() is None, f"ended early:\n{launcher.stdout.read()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.2)
        refresher = [p for p in _descendants(launcher.pid) if is_refresher(p)]
        assert len(refresher) == 1, refresher
        os.kill(refresher[0], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    return launcher.returncode, output


def check_replaced(rows: list[dict]) -> dict:
    """The loss is logged once, a replacement is started at that step, and versions rise again after it (the
    replacement's). Returns the loss's row."""
    lost = [r for r in rows if r.get("refresher_lost")]
    assert len(lost) == 1, "the loss of the refresher is logged once"
    assert lost[0].get("refresher_respawned") == 1, "a replacement is started at the step the loss is noticed"
    versions = [r["index_version"] for r in rows if r["step"] >= lost[0]["step"]]
    assert versions == sorted(versions) and versions[-1] >= lost[0]["index_version"] + 2, versions
    return lost[0]


def test_training_survives_a_killed_refresher_and_respawns_it(tmp_path):
    pytest.importorskip("mpi4py")
    # 40 steps: the replacement imports torch and builds its encoder (~10 steps here) before its first version.
    out, steps = tmp_path / "run", 40
    cmd = " ".join(str(c) for c in [*REALM, "pretrain", "--out", out, "--steps", steps, "--refreshers", 1, *SMALL,
                                    "--set", "refresh.mode=mpi", "--set", "refresh.every=3",
                                    "--set", "refresh.timeout_s=3", "--set", "train.reader_warmup_steps=4"])
    rc, output = run_and_kill_refresher([MPIEXEC, "-disable-auto-cleanup", "-n", 2, "bash", "-c",
                                         f'trap "" USR1; {cmd}; exit $?'], tmp_path, _env(), out,
                                        lambda pid: _world_rank(pid) == 1)
    assert (out / "summary.json").exists(), f"exit {rc}:\n{output[-5000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps, summary  # the trainer finished its run
    rows = _rows_if_any(out)
    lost = check_replaced(rows)
    frozen = lost["index_version"]
    # No new version for a while after the loss (the killed rank's refresh never lands): staleness grows, then the
    # replacement's versions come in (check_replaced).
    stale = [r["staleness"] for r in rows if r["step"] >= lost["step"] and r["index_version"] == frozen]
    assert stale == sorted(stale) and stale[-1] > stale[0] and stale[-1] > 3
    assert summary["max_staleness_steps"] >= stale[-1]
    assert "replacement refresher" in output


def test_failed_spawn_is_one_line_and_no_replacement(capsys):
    MPI = pytest.importorskip("mpi4py.MPI")
    from realm_hpc.retrieval.refresh import RefresherSpawner

    class NoSpawnComm:  # what a launcher without dynamic processes answers
        def Get_rank(self):
            return 0

        def Spawn(self, *args, **kwargs):
            raise MPI.Exception(MPI.ERR_SPAWN)

    assert RefresherSpawner(NoSpawnComm(), 1).spawn() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no replacement refresher" in err[0] and "last index" in err[0], err


def test_respawn_under_srun_needs_steps_that_may_overlap():
    """Under srun MPI_Comm_spawn starts a new job step, which waits for the CPUs the running step holds unless steps
    may overlap: without SLURM_OVERLAP the CLI turns respawn off (tested against a real Slurm in test_slurm.py)."""
    from realm_hpc.dist import spawn_would_wait_forever

    assert spawn_would_wait_forever({}) is None  # mpiexec / torchrun outside Slurm
    assert spawn_would_wait_forever({"SLURM_JOB_ID": "7"}) is None  # the batch shell, outside any job step
    why = spawn_would_wait_forever({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"})
    assert why is not None and "7.0" in why and "SLURM_OVERLAP" in why
    assert spawn_would_wait_forever({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_OVERLAP": "1"}) is None


def test_an_mpi_error_drops_the_refreshers_and_any_other_error_stops_training(capsys):
    """An MPI error on the refreshers' messages (Open MPI with ULFM reports a dead rank so, at once; mpich may in
    some windows) marks the set lost at the next boundary, as the timeout does, with one line naming the error.
    Any other error in the comm thread is a bug, surfaced to the training loop."""
    MPI = pytest.importorskip("mpi4py.MPI")
    from realm_hpc.retrieval.refresh import MPIRefresher

    class Comm:
        def __init__(self, error):
            self.error = error

        def send(self, *args, **kwargs):
            pass

        def irecv(self, *args, **kwargs):
            raise self.error

    mpi_error = MPIRefresher(Comm(MPI.Exception(MPI.ERR_OTHER)), [1], n_docs=4, dim=2, every=3, run_dir="r",
                             timeout_s=0)  # 0: the timeout never fires, only MPI's report can
    mpi_error._thread.join(timeout=10)
    assert mpi_error.take() is None  # no error raised into the loop
    assert mpi_error.check_lost() and not mpi_error.check_lost() and mpi_error.losses == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MPI error talking to the refreshers" in err[0] and "lost" in err[0], err

    bug = MPIRefresher(Comm(ValueError("a bug")), [1], n_docs=4, dim=2, every=3, run_dir="r", timeout_s=0)
    bug._thread.join(timeout=10)
    with pytest.raises(RuntimeError, match="index refresh failed: a bug"):
        bug.take()
    assert not bug.check_lost()
