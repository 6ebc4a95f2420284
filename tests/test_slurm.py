"""slurm/pretrain.sbatch against a real single-node Slurm: 1 trainer + 1 refresher under `srun --mpi=pmi2`, then a
second job preempted with the warning signal: it checkpoints, exits EXIT_PREEMPTED, requeues itself and resumes.

Needs root (slurmd, munged) and Slurm installed; as root with apt-get the fixture installs it (tests/slurm_cluster.py).
Anything missing skips the module with the reason (run pytest with -rs, the default here, to see it).
"""

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from realm_hpc.checkpoint import load_checkpoint
from realm_hpc.metrics import read_metrics
from realm_hpc.preempt import EXIT_PREEMPTED
from slurm_cluster import SlurmCluster, ensure_installed
from test_refresher_death import check_replaced

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "pretrain.sbatch"
ICT_STEPS = 6
# A small world and short phases (the test_resume settings, with eval at the end only).
SMALL = ["--set", "train.log_every=1", "--set", "refresh.every=4", "--set", f"ict.steps={ICT_STEPS}",
         "--set", f"ict.eval_every={ICT_STEPS}", "--set", "train.reader_warmup_steps=3",
         "--set", "train.eval_every=1000", "--set", "train.checkpoint_every=1000",
         "--set", "data.world_people=60", "--set", "data.world_orgs=12", "--set", "data.world_cities=8",
         "--set", "data.world_surnames=10", "--set", "data.heldout_facts=20", "--set", "data.eval_examples=20"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 240


def _unavailable() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "a test Slurm cluster needs root (slurmd and munged run as root / munge)"
    if (os.cpu_count() or 1) < 2:
        return "a test Slurm cluster for 1 trainer + 1 refresher needs 2 CPUs"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install mpi4py mpich)"
    return ensure_installed()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def _submit(cluster, tmp_path, run_dir, steps, extra=()):
    env = {"RECIPE": "tiny", "RUN_DIR": str(run_dir), "REFRESHERS": "1", "REALM_HPC_HOME": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    # cwd = tmp_path: the log (%x-%j.out) lands in the submit directory.
    return cluster.sbatch(SCRIPT, ["--steps", str(steps), *SMALL, *extra], env=env, cwd=tmp_path)


def _log(tmp_path, job_id, name="realm-pretrain") -> str:
    path = tmp_path / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_pretrain_sbatch_one_trainer_one_refresher(cluster, tmp_path):
    run_dir, steps = tmp_path / "run", 12
    t0 = time.monotonic()
    job = _submit(cluster, tmp_path, run_dir, steps)
    info = cluster.wait_state(job, DONE, JOB_TIMEOUT_S)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    print(f"job {job}: {time.monotonic() - t0:.1f} s")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["refresh_mode"] == "mpi" and summary["steps"] == steps
    # Versions beyond the first come only from the refresher rank: the srun step had a world of 2.
    assert summary["index_versions"] >= 2
    losses = _losses(run_dir)
    assert sorted(losses) == [ICT_STEPS + s for s in range(1, steps + 1)]
    assert all(math.isfinite(v) for v in losses.values())
    assert "srun --mpi=pmi2 --ntasks=2" in log and "--refreshers 1" in log
    assert "--resume" not in log  # a fresh run dir


def _task_pids(job_id: str, procid: int) -> list[int]:
    """The realm-hpc processes of task `procid` in the job's first step."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), b"SLURM_STEP_ID=0", f"SLURM_PROCID={procid}".encode()}
    pids = []
    for p in Path("/proc").iterdir():
        try:
            env = set((p / "environ").read_bytes().split(b"\0")) if p.name.isdigit() else set()
            cmd = (p / "cmdline").read_bytes() if want <= env else b""
        except OSError:  # gone, or not ours to read
            continue
        if b"realm" in cmd and cmd.startswith(sys.executable.encode()):
            pids.append(int(p.name))
    return pids


def test_killed_refresher_is_replaced_and_the_job_completes(cluster, tmp_path):
    """kill -9 of the refresher task: the trainer goes on with the last index, spawns a replacement (a new job step
    that may share the step's CPUs: the script exports SLURM_OVERLAP), index versions rise again, and the job ends
    COMPLETED although srun reports the killed task."""
    run_dir, steps = tmp_path / "run", 40
    job = _submit(cluster, tmp_path, run_dir, steps,
                  ["--set", "refresh.every=3", "--set", "refresh.timeout_s=3"])
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((run_dir / "metrics.jsonl").exists()
               and any(r.get("index_version", 0) >= 2 for r in read_metrics(run_dir))):
        assert cluster.job(job)["JobState"] not in DONE, _log(tmp_path, job)[-3000:]
        assert time.monotonic() < deadline, f"no second index version in {JOB_TIMEOUT_S} s"
        time.sleep(0.2)
    refresher = _task_pids(job, 1)
    assert len(refresher) == 1, refresher
    os.kill(refresher[0], signal.SIGKILL)
    info = cluster.wait_state(job, DONE, JOB_TIMEOUT_S)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "but the trainers finished the run" in log and "refresh.respawn off" not in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    check_replaced([r for r in read_metrics(run_dir) if "index_version" in r])


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    run_dir, steps = tmp_path / "run", 16
    t0 = time.monotonic()
    job = _submit(cluster, tmp_path, run_dir, steps)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((run_dir / "metrics.jsonl").exists() and _losses(run_dir)):
        assert cluster.job(job)["JobState"] not in DONE, _log(tmp_path, job)[-3000:]
        assert time.monotonic() < deadline, f"no REALM step within {JOB_TIMEOUT_S} s: {_log(tmp_path, job)[-3000:]}"
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@120` does 120 s before the time limit: USR1 to the batch shell only.
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    # The job requeues itself: back to PENDING with Restarts=1 (it may start again cred_expire = 10 s later).
    info = cluster.wait_state(job, {"PENDING", "REQUEUED", *DONE}, JOB_TIMEOUT_S)
    assert info["JobState"] in {"PENDING", "REQUEUED"} and info["Restarts"] == "1", _log(tmp_path, job)[-3000:]
    stopped_losses = _losses(run_dir)
    stopped_at = max(stopped_losses)
    ckpt = load_checkpoint(run_dir / "checkpoint")["run_state"]
    assert ckpt["step"] == stopped_at - ICT_STEPS and 1 <= ckpt["step"] < steps
    print(f"job {job}: preempted at step {stopped_at} after {time.monotonic() - t0:.1f} s")

    info = cluster.wait_state(job, DONE, JOB_TIMEOUT_S)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    print(f"job {job}: requeued run finished after {time.monotonic() - t0:.1f} s")
    assert f"preempted by SIGUSR1 at step {stopped_at}: checkpoint written" in log
    assert f"exited {EXIT_PREEMPTED}: requeueing" in log
    assert f"resuming at step {ckpt['step']}" in log  # the requeued start found the run and added --resume
    losses = _losses(run_dir)
    assert sorted(losses) == [ICT_STEPS + s for s in range(1, steps + 1)]  # nothing lost, nothing doubled
    assert all(losses[s] == stopped_losses[s] for s in stopped_losses)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["refresh_mode"] == "mpi"


def test_finetune_sbatch_passes_the_cli_arguments_and_resumes(cluster, tmp_path):
    """The finetune script's command line, through a stand-in CLI (the finetune run itself is tested elsewhere)."""
    fake, calls = tmp_path / "fake-realm-hpc", tmp_path / "calls.txt"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    out_dir = tmp_path / "qa"
    env = {**os.environ, "PRETRAINED": "runs/demo", "OUT_DIR": str(out_dir), "REALM_HPC": str(fake),
           "REALM_HPC_HOME": str(ROOT)}
    for _ in range(2):
        job = cluster.sbatch(ROOT / "slurm" / "finetune.sbatch", ["--set", "train.steps=5"], env=env, cwd=tmp_path)
        info = cluster.wait_state(job, DONE, 60)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _log(tmp_path, job, "realm-finetune")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}\n")  # as if the first run had started (its first write)
    first, second = calls.read_text().splitlines()
    assert first == f"finetune --recipe qa-demo --pretrained runs/demo --out {out_dir} --set train.steps=5"
    assert second == f"finetune --recipe qa-demo --pretrained runs/demo --out {out_dir} --resume --set train.steps=5"


def test_without_root_or_apt_the_reason_is_given(monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in _unavailable()
    monkeypatch.setattr(slurm_cluster, "_which", lambda name: None)
    assert "not root" in slurm_cluster.ensure_installed()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    assert "no apt-get" in slurm_cluster.ensure_installed()
