"""bench/gpu_check.sh, the prepared first GPU job: its dry run (GPU_CHECK_DRY=1: the same steps on the CPU at toy
sizes) on an environment that lacks what a bare GPU image lacks (faiss, deepspeed, matplotlib, tensorboard hidden),
its step runner (time limits that kill a hung step's whole process group, skips, the budget), the wheel install
(only the missing distributions) and the summary of a failed step. Nothing here needs a GPU; no speed is asserted."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
HIDDEN = ("faiss", "deepspeed", "matplotlib", "tensorboard")  # what the GPU image lacks beside the bundle
STEPS = ["wheels", "env", "pytest_gpu", "ip_topk", "marginal_lse", "head", "train_step", "cuda_e2e", "demo_mpi"]


def _hide(folder: Path) -> Path:
    """A folder of modules that fail to import as the absent ones do: first on PYTHONPATH, it hides the real ones."""
    folder.mkdir()
    for name in HIDDEN:
        (folder / f"{name}.py").write_text(f"raise ModuleNotFoundError('{name}: hidden by tests/test_gpu_check.py')\n")
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, bundle = tmp / "out", tmp / "no-wheels"
    bundle.mkdir()
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(bundle),
           "PYTHONPATH": str(_hide(tmp / "hidden")), "TMPDIR": str(tmp)}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text()), proc.stdout


def test_dry_run_runs_every_step(dry_run):
    out, summary, stdout = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["steps.log", "summary.json", "summary.md"]  # no matplotlib
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == STEPS and summary["dry"] is True
    assert steps["wheels"]["status"] == "skipped" and "no wheel bundle" in steps["wheels"]["why"]
    assert all(s["status"] == "ok" for name, s in steps.items() if name != "wheels"), summary["steps"]
    assert all(s["seconds"] <= s["limit_s"] + 25 for s in summary["steps"] if s["status"] == "ok")
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check (dry run, CPU, toy sizes)") and "| demo_mpi | ok |" in md
    assert md in stdout and "===== demo_mpi: ok" in (out / "steps.log").read_text()


def test_dry_run_reports_the_missing_pieces(dry_run):
    _, summary, _ = dry_run
    modules = summary["results"]["env"]["modules"]
    for name in HIDDEN:
        assert modules[name]["version"] is None and "hidden by tests" in modules[name]["error"]
    assert modules["torch"]["version"] and modules["mpi4py"]["version"]
    assert summary["results"]["env"]["cuda"]["available"] is False
    assert summary["results"]["wheels"]["mpi"]["ok"] is True  # the venv's mpich runs two ranks
    topk = summary["results"]["ip_topk"]
    assert [s["method"] for s in topk["skipped"]] == ["faiss"] and "not importable" in topk["skipped"][0]["why"]


def test_dry_run_numbers(dry_run):
    _, summary, _ = dry_run
    res = summary["results"]
    topk = res["ip_topk"]
    assert topk["complete"] and topk["meta"]["copy_gbs"] > 0
    cells = {(r["B"], r["k"], r["method"]) for r in topk["rows"]}
    assert cells == {(b, k, m) for b in (1, 64) for k in (8, 64) for m in ("kernels.ip_topk[torch]", "torch_mm_topk")}
    for r in topk["rows"]:
        assert (r["N"], r["D"], r["dtype"]) == (20011, 128, "bf16") and r["p50_ms"] > 0 and r["frac_copy_bw"] > 0
        if r["method"].startswith("kernels."):
            assert r["recall"] == 1.0  # against itself: the exact answer
    assert len(res["marginal_lse"]["rows"]) == 2 * 2 * 2 * 2  # B x docs x dtype x (ours, naive)
    head = res["head"]["rows"]
    assert [(r["method"], r["dtype"]) for r in head] == [(m, d) for d in ("fp32", "bf16")
                                                        for m in ("naive", "chunked", "chunked")]
    assert [r["phase"] for r in res["train_step"]["rows"]][-1] == "total"
    for name in ("pytest_gpu", "cuda_e2e"):  # on the CPU every GPU test skips, and none fails
        counts = res[name]["counts"]
        assert counts["failed"] == counts["error"] == counts["passed"] == 0 and counts["skipped"] > 0
    demo = res["demo_mpi"]["summary"]
    assert demo["refresh_mode"] == "mpi" and demo["steps"] == 6 and demo["index_versions"] >= 2


def _runner(tmp_path: Path, script: str) -> list[list[str]]:
    """Source gpu_check.sh (its functions only) and run ``script``: the steps.tsv rows it recorded."""
    work = tmp_path / "work"
    work.mkdir()
    prelude = (f"source {SCRIPT}; WORK={work}; DRY=1; BUDGET_S=100; RESERVE_S=0; "
               "DEADLINE=$(($(date +%s) + 100)); ")
    proc = subprocess.run(["bash", "-c", prelude + script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()]


def _alive(pid: int) -> bool:
    """Running (a zombie that no parent has reaped yet is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_step_runner_kills_a_hung_step_and_goes_on(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    rows = _runner(tmp_path, (
        f"step hung 2 bash -c 'sleep 300 & echo $! > {pid_file}; wait'; "
        "step fine 20 true; "
        "step broken 20 bash -c 'echo some output; exit 3'; "
        f"step self_skip 20 bash -c 'echo no faiss here > {tmp_path / 'work' / 'self_skip.skip'}'; "
        "SKIP_RC=5 SKIP_WHY='no test collected' step no_tests 20 bash -c 'exit 5'; "
        "MIN_S=101 step late 20 true; "
        "GPU_CHECK_STEPS='fine' step not_asked 20 true; "
        "HAVE_TORCH=0 device_step no_torch 20 true"))
    by_name = {r[0]: r for r in rows}
    assert list(by_name) == ["hung", "fine", "broken", "self_skip", "no_tests", "late", "not_asked", "no_torch"]
    name, status, seconds, limit, rc, why = by_name["hung"]
    assert status == "failed" and rc == "124" and why == "timed out after 2 s (exit 124)" and float(seconds) < 20
    assert not _alive(int(pid_file.read_text()))  # the step's whole process group went, not only its first process
    assert by_name["fine"][1] == "ok" and by_name["broken"][1:6:4] == ["failed", "exit 3"]
    assert by_name["self_skip"][1:6:4] == ["skipped", "no faiss here"]
    assert by_name["no_tests"][1:6:4] == ["skipped", "no test collected"]
    assert by_name["late"][1] == "skipped" and by_name["late"][5].startswith("no time left")
    assert by_name["not_asked"][1:6:4] == ["skipped", "not in GPU_CHECK_STEPS"]
    assert by_name["no_torch"][1:6:4] == ["skipped", "torch does not import (see env)"]


def test_summary_shows_a_failed_step_with_its_log_tail(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "steps.tsv").write_text("env\tok\t3.0\t90\t0\t-\nip_topk\tfailed\t150.2\t150\t124\ttimed out after 150 s "
                                    "(exit 124)\nhead\tskipped\t0\t-\t-\ttorch sees no CUDA device (see env)\n")
    (work / "ip_topk.log").write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: CUDA error: an "
                                      "illegal memory access was encountered\n")
    gpu_check.summary(out, work)
    summary = json.loads((out / "summary.json").read_text())
    failed = summary["steps"][1]
    assert failed["status"] == "failed" and failed["rc"] == 124 and len(failed["log_tail"]) == gpu_check.TAIL_LINES
    assert failed["log_tail"][-1].startswith("RuntimeError: CUDA error") and failed["log_tail"][0] == "line 71"
    md = (out / "summary.md").read_text()
    assert "steps: 1 ok, 1 failed, 1 skipped" in md
    assert "| ip_topk | failed | 150 | 150 | - | timed out after 150 s (exit 124) |" in md
    assert "failed (timed out after 150 s (exit 124)); the log's last lines:" in md and "illegal memory access" in md
    assert "skipped: torch sees no CUDA device (see env)" in md


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of one module ``name`` (RECORD with sha256 hashes, as pip expects)."""
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for p, d in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, d in {**files, f"{name}-{version}.dist-info/RECORD": record.encode()}.items():
            z.writestr(p, d)
    return path


def test_install_adds_only_the_missing_distributions(tmp_path, monkeypatch):
    bundle, work = tmp_path / "bundle", tmp_path / "work"
    bundle.mkdir()
    work.mkdir()
    _wheel(bundle, "gpu_check_probe", "1.0")  # absent here: installed
    _wheel(bundle, "numpy", "0.0.1")  # present here (any version): left alone
    bin_dir = str(Path(sys.executable).parent)  # the venv's mpiexec for the MPI probe
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    assert gpu_check.install(bundle, work) == 0
    report = json.loads((work / "wheels.json").read_text())
    assert report["installed"] == ["gpu_check_probe-1.0-py3-none-any.whl"] and "numpy" in report["present"]
    assert (work / "wheels.detail").read_text().startswith("installed 1 of 2 bundled wheels (gpu-check-probe)")
    exports = (work / "site.env").read_text()
    probe = subprocess.run(["bash", "-c", f"{exports}\n{sys.executable} -c 'import gpu_check_probe, numpy; "
                            "print(gpu_check_probe.VERSION, numpy.__version__ != \"0.0.1\")'"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["1.0", "True"], probe.stderr
    assert (work / "mpi.txt").read_text().startswith("ok ") == report["mpi"]["ok"]


def test_bench_sbatch_runs_the_kernel_and_head_benches(tmp_path):
    """slurm/bench.sbatch outside Slurm on stub commands that log their arguments: the GPU grid runs the kernel bench
    (13.35M x 128, k 8 and 64; its torch baseline and copy bandwidth are always measured) and the head bench."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    for name in ("realm-hpc", "python"):
        (venv / "bin" / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {log}\n')
        (venv / "bin" / name).chmod(0o755)
    calls = {}
    for quick in ("", "1"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(VENV=str(venv), OUT=str(tmp_path / "out"), QUICK=quick)
        log.write_text("")
        subprocess.run(["bash", str(ROOT / "slurm" / "bench.sbatch")], env=env, check=True, capture_output=True,
                       timeout=60)
        calls[quick] = [line.split() for line in log.read_text().splitlines()]
    for quick, lines in calls.items():
        kernels = [c for c in lines if c[1:2] == ["bench/bench_kernels.py"]]
        head = [c for c in lines if c[1:2] == ["bench/bench_head.py"]]
        assert len(kernels) == len(head) == 1, lines
        k = kernels[0]
        assert k[k.index("--k") + 1:k.index("--k") + 3] == ["8", "64"] and ("--quick" in k) == bool(quick)
        assert "bf16" in head[0] and "fp32" in head[0]
    full = next(c for c in calls[""] if c[1:2] == ["bench/bench_kernels.py"])
    assert full[full.index("--n") + 1:full.index("--n") + 3] == ["1000000", "13350000"]


def test_metrics_without_tensorboard_and_matplotlib(tmp_path, monkeypatch, capsys):
    """Only outputs depend on them: the JSONL is written whole, the TensorBoard events and the PNG are left out
    with one warning line each (the demo step of the dry run does the same inside a real MPI pretraining)."""
    from realm_hpc.metrics import MetricsLogger, plot_curves, read_metrics

    for name in ("tensorboard", "torch.utils.tensorboard", "matplotlib", "matplotlib.backends.backend_agg",
                 "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with MetricsLogger(tmp_path) as log:
        log.log(1, loss=2.5, phase="ict")
        log.mark_event(2, "refresh")
        log.log(3, loss=1.25)
    assert [r.get("loss") for r in read_metrics(tmp_path / "metrics.jsonl")] == [2.5, None, 1.25]
    assert plot_curves(tmp_path) is None
    assert not (tmp_path / "tb").exists() and not (tmp_path / "curves.png").exists()
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == ["warning: no TensorBoard events", "warning: no curves.png"]
