"""`make install` (behind `make demo` / `make test`) picks the CPU or the CUDA builds: checked with `make -n`, which
prints the commands without running them, into a venv path that does not exist (so every command is printed)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not found")


def _plan(tmp_path, *args, nvidia_smi: str | None = None) -> str:
    """`make -n install` as a fresh machine would run it; nvidia_smi: the exit status a fake nvidia-smi on PATH gives
    (None: no nvidia-smi at all)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\nexit {nvidia_smi}\n")
        (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("GPU", "MAKEFLAGS", "MFLAGS")}
    env["PATH"] = f"{fake}{os.pathsep}/usr/bin{os.pathsep}/bin"  # no nvidia-smi of the machine's own
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", *args, "install"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _stamp(plan: str) -> str:
    return re.search(r"touch (\S+)", plan).group(1)


def test_gpu_install_takes_the_cuda_builds_and_its_own_stamp(tmp_path):
    gpu, cpu = _plan(tmp_path, "GPU=1"), _plan(tmp_path, "GPU=0")
    venv = tmp_path / "venv"
    assert f"-c {venv}/pins-gpu.txt -e '.[gpu,dev]'" in gpu and "[cpu" not in gpu
    assert "grep -v '^triton==' requirements-pins.txt" in gpu  # the CUDA torch pins its own triton
    assert "assert torch.version.cuda" in gpu  # a CPU torch would be an error, not a silent CPU venv
    assert "pip uninstall -q -y faiss-cpu" in gpu  # both install the `faiss` package
    assert "-c requirements-pins.txt -e '.[cpu,dev]'" in cpu and "[gpu" not in cpu
    assert "pip uninstall -q -y faiss-gpu" in cpu and "torch.version.cuda" not in cpu
    for plan in (gpu, cpu):
        torch_at = plan.index("pip install -q torch==2.13.0")
        assert torch_at < plan.index("deepspeed==0.19.8 --no-build-isolation") < plan.index("-e '.[")
    stamps = _stamp(gpu), _stamp(cpu)
    assert stamps[0].startswith(f"{venv}/.installed-gpu-") and stamps[1].startswith(f"{venv}/.installed-cpu-")
    assert stamps[0] != stamps[1]  # a CPU venv is never taken for a GPU one: switching reinstalls


@pytest.mark.parametrize("status,kind", [("0", "gpu"), ("9", "cpu"), (None, "cpu")],
                         ids=["nvidia-smi-answers", "nvidia-smi-fails", "no-nvidia-smi"])
def test_without_gpu_set_nvidia_smi_decides(tmp_path, status, kind):
    assert f"/.installed-{kind}-" in _stamp(_plan(tmp_path, nvidia_smi=status))


def test_gpu_0_forces_the_cpu_builds_where_nvidia_smi_answers(tmp_path):
    assert "/.installed-cpu-" in _stamp(_plan(tmp_path, "GPU=0", nvidia_smi="0"))


def test_any_other_gpu_value_is_an_error(tmp_path):
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", "GPU=yes", "install"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "GPU=yes: expected 1 (CUDA builds) or 0 (CPU builds)" in proc.stderr
