"""A real single-node Slurm (Debian slurmctld + slurmd + munge) in a temp dir, for testing slurm/*.sbatch.

The recipe is ../shared/FACTS.md "A real single-node Slurm for tests". Nothing under /etc is written: daemons and
clients read the config named by SLURM_CONF. Ports are picked free, so a daemon left over from a killed session
cannot collide; a file lock serialises test sessions that run at once on one machine (munge is shared).
`SlurmCluster.unavailable()` says why a cluster cannot be had here (not root, no apt-get, install failed), so
the test can skip with that reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged"]
LOCK_FILE = Path("/tmp/realm-hpc-slurm-test.lock")
INSTALL_LOG = Path("/tmp/realm-hpc-slurm-install.log")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d, name)).exists()),
                                      None)


def _missing() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_installed() -> str | None:
    """Install Slurm + munge with apt-get if they are missing. Returns None when ready, else the reason not."""
    if not _missing():
        return None
    if os.geteuid() != 0:
        return f"Slurm not installed ({', '.join(_missing())} missing) and not root, so apt-get cannot install it"
    if shutil.which("apt-get") is None:
        return f"Slurm not installed ({', '.join(_missing())} missing) and no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(INSTALL_LOG, "w") as log:
        for cmd in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
            except subprocess.TimeoutExpired:
                return f"`{' '.join(cmd)}` timed out after 300 s (log: {INSTALL_LOG})"
            if rc != 0:
                return f"`{' '.join(cmd)}` failed with exit {rc} (no network to the mirror?) (log: {INSTALL_LOG})"
    if _missing():
        return f"apt-get installed {PACKAGES} but {', '.join(_missing())} still missing (log: {INSTALL_LOG})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._lock = None
        self.first_job_id = 1000 + (os.getpid() * 1009 + time.time_ns() // 1000) % 60_000_000
        self._started_munge = False

    def config_text(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=sandbox", "SlurmctldHost=localhost", "SlurmUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=pmi2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={r}/jobcomp.txt", "MailProg=/bin/true",
            "ReturnToService=2", "EnforcePartLimits=ALL",
            # A requeued job waits cred_expire seconds before it may start (default 120) and pending jobs are looked
            # at every sched_interval seconds (default 60): both shortened so a requeue test takes seconds.
            "AuthInfo=cred_expire=10", "SchedulerParameters=sched_interval=1",
            # A job that ignores SIGTERM is SIGKILLed after KillWait seconds (default 30).
            "KillWait=10",
            # mpich names its shared-memory segment after the PMI job (job id.step id): a step killed by a signal
            # leaves /dev/shm/mpich_shm_* behind, and a later cluster that counted from job 1 again would attach
            # to it and fail in MPI_Init. So each cluster counts from its own first id.
            f"FirstJobId={self.first_job_id}",
            f"NodeName=localhost CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 "
            "RealMemory=2000 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        self._lock = open(LOCK_FILE, "w")
        deadline = time.monotonic() + 600
        while True:  # another session's cluster goes first
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{LOCK_FILE} held by another test session for 600 s") from None
                time.sleep(0.5)
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config_text())
        if not _munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True, timeout=30)
            self._started_munge = True
        # -c: a clean state (no jobs from an earlier cluster in a reused dir).
        subprocess.run([_which("slurmctld"), "-c", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        subprocess.run([_which("slurmd"), "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"slurm node not idle after {timeout_s} s (state {state!r}); logs: {self.logs()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        # Jobs first: a job step whose slurmd is gone hangs in MPI_Finalize (its PMI2 server never answers).
        if self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
            self.run(["scancel", "--full", "--user", "root"], check=False)
            deadline = time.monotonic() + timeout_s
            while self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for name in ("slurmctld", "slurmd"):
            self._kill_pidfile(self.root / f"{name}.pid")
        if self._started_munge:
            self._kill_pidfile(Path("/run/munge/munged.pid"))
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    @staticmethod
    def _kill_pidfile(path: Path, timeout_s: float = 10.0) -> None:
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def logs(self) -> str:
        return ", ".join(str(self.root / f) for f in ("slurmctld.log", "slurmd.log"))

    # -- jobs --------------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
                             timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(self, script: str | Path, args: list[str] = (), env: dict | None = None, cwd=None) -> str:
        return self.run(["sbatch", "--parsable", str(script), *args], env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def wait_state(self, job_id: str, states: set[str], timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s} s "
                                   f"(wanted {sorted(states)}); logs: {self.logs()}")
            time.sleep(0.2)
