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


def _world_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, PermissionError):
        return None
    if b"realm_hpc" not in cmd or not cmd.startswith(sys.executable.encode()):
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"PMI_RANK=")]
    return int(ranks[0]) if ranks else None


def test_training_survives_a_killed_refresher_and_respawns_it(tmp_path):
    pytest.importorskip("mpi4py")
    # 40 steps: the replacement imports torch and builds its encoder (~10 steps here) before its first version.
    out, steps = tmp_path / "run", 40
    cmd = " ".join(str(c) for c in [*REALM, "pretrain", "--out", out, "--steps", steps, "--refreshers", 1, *SMALL,
                                    "--set", "refresh.mode=mpi", "--set", "refresh.every=3",
                                    "--set", "refresh.timeout_s=3", "--set", "train.reader_warmup_steps=4"])
    launcher = subprocess.Popen([str(MPIEXEC), "-disable-auto-cleanup", "-n", "2", "bash", "-c",
                                 f'trap "" USR1; {cmd}; exit $?'], cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while not any(r["index_version"] >= 2 for r in _rows_if_any(out)):
            assert launcher.poll() is None, f"ended early:\n{launcher.stderr.read()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.2)
        refresher = [p for p in _descendants(launcher.pid) if _world_rank(p) == 1]
        assert len(refresher) == 1, refresher
        os.kill(refresher[0], signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps, summary  # the trainer finished its run
    rows = _rows_if_any(out)
    lost = [r for r in rows if r.get("refresher_lost")]
    assert len(lost) == 1, "the loss of the refresher is logged once"
    assert lost[0].get("refresher_respawned") == 1, "a replacement is started at the step the loss is noticed"
    frozen = lost[0]["index_version"]
    after = [r for r in rows if r["step"] >= lost[0]["step"]]
    # No new version for a while after the loss (the killed rank's refresh never lands): staleness grows...
    stale = [r["staleness"] for r in after if r["index_version"] == frozen]
    assert stale == sorted(stale) and stale[-1] > stale[0] and stale[-1] > 3
    # ...then the replacement's versions come in and keep rising until the end of the run.
    versions = [r["index_version"] for r in after]
    assert versions == sorted(versions) and versions[-1] >= frozen + 2, versions
    assert summary["max_staleness_steps"] >= stale[-1]
    assert "replacement refresher" in stderr + stdout


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


def test_only_ulfm_failure_classes_count_as_a_dead_rank():
    """mpich has no ULFM classes (mpi4py maps their names to ERR_UNKNOWN): no error of it reads as a dead rank, so
    the comm thread surfaces it instead of hiding it as a lost refresher. Open MPI's are tested in test_openmpi.py."""
    MPI = pytest.importorskip("mpi4py.MPI")
    from realm_hpc.retrieval.refresh import rank_failed

    assert not rank_failed(RuntimeError("not MPI"))
    assert not rank_failed(MPI.Exception(MPI.ERR_UNKNOWN))
    assert not rank_failed(MPI.Exception(MPI.ERR_TRUNCATE))
    if MPI.ERR_PROC_FAILED != MPI.ERR_UNKNOWN:  # an MPI library with ULFM
        assert rank_failed(MPI.Exception(MPI.ERR_PROC_FAILED))
