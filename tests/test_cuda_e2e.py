"""The GPU device path end to end (train.device=cuda): skipped, with the reason shown, where torch sees no CUDA device.

Written on a CPU-only machine: these tests have never run here. On a GPU machine they check that a tiny pretraining
runs with the model, batches and index on the GPU and resumes from its GPU checkpoint on the CPU; that one DeepSpeed
trainer (nccl, world size 1) runs on the GPU although DS_ACCELERATOR=cpu is in the environment; that the MPI
refresher re-encodes on the GPU; that two trainers run over nccl with a sharded index (2 GPUs); that with
train.deterministic=true two runs and a resumed run give the same losses; and that a fine-tune runs on the GPU. With TRITON_INTERPRET=1 (tests/conftest.py's
default) the kernels run the torch reference on the GPU tensors; `TRITON_INTERPRET=0 pytest -m gpu
tests/test_cuda_e2e.py` runs the compiled Triton kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from realm_hpc.checkpoint import load_checkpoint
from realm_hpc.cli import main
from realm_hpc.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (train.device=cuda)")]

SMALL = ["--set", "data.world_people=60", "--set", "data.world_orgs=12", "--set", "data.world_cities=6",
         "--set", "data.heldout_facts=10", "--set", "data.eval_examples=10", "--set", "model.vocab_size=400"]
PRETRAIN = ["pretrain", "--recipe", "tiny", "--steps", "8", "--set", "refresh.every=4", "--set", "ict.steps=6",
            "--set", "train.reader_warmup_steps=3", "--set", "train.log_every=1", "--set", "train.eval_every=1000",
            "--set", "train.checkpoint_every=4", *SMALL]


@pytest.fixture(autouse=True)
def kernels_for_the_interpreter(monkeypatch):
    """The Triton interpreter on GPU tensors would be slow: use the torch reference unless it is off."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        monkeypatch.setenv("REALM_HPC_KERNELS", "torch")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "run"
    main([*PRETRAIN, "--out", str(out), "--set", "train.device=cuda"])
    return out


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_pretrain_on_cuda(gpu_run):
    summary = json.loads((gpu_run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["index_versions"] == 2
    losses = _losses(gpu_run)
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert 0.0 <= summary["test_recall_at_8"] <= 1.0 and 0.0 <= summary["test_mlm_acc_retrieval"] <= 1.0
    ckpt = load_checkpoint(gpu_run / "checkpoint")  # mapped to the CPU, whatever device wrote it
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert json.loads((gpu_run / "config.json").read_text())["train"]["device"] == "cuda"
    main(["evaluate", "--run", str(gpu_run)])  # on the run's device: its summary's numbers
    result = json.loads((gpu_run / "eval.json").read_text())
    assert result["test_recall_at_8"] == pytest.approx(summary["test_recall_at_8"])


def test_gpu_checkpoint_resumes_on_the_cpu(gpu_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gpu_run, run)
    # From the GPU run's final (step 8) checkpoint, on the CPU to step 10.
    main([*PRETRAIN[:3], "--steps", "10", "--out", str(run), "--resume", "--set", "train.device=cpu"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10 and np.all(np.isfinite(_losses(run)))


def test_one_deepspeed_trainer_on_cuda(tmp_path):
    """DS_ACCELERATOR=cpu (conftest's) must not pull the GPU trainer's engine to the CPU."""
    pytest.importorskip("deepspeed")  # a bare GPU image may lack it (bench/gpu_check.sh then reports the skip)
    out = tmp_path / "ds"
    cfg = Path(__file__).parents[1] / "configs" / "ds_zero2.json"
    main([*PRETRAIN, "--out", str(out), "--set", "train.device=cuda", "--deepspeed-config", str(cfg)])
    assert len(_losses(out)) == 8 and np.all(np.isfinite(_losses(out)))
    assert list((out / "deepspeed").glob("step*"))
    import torch.distributed as dist

    assert not dist.is_initialized()  # the CLI left its (nccl) group


def test_mpi_refresher_on_cuda(tmp_path):
    """One trainer + one refresher rank, both on the GPU (the refresher by refresh.device=auto)."""
    import shutil

    pytest.importorskip("mpi4py")
    bin_dir = Path(sys.executable).parent
    mpiexec = bin_dir / "mpiexec" if (bin_dir / "mpiexec").exists() else shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    out = tmp_path / "mpi"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TRITON_INTERPRET", None)  # compiled Triton on the GPU
    # `python -m realm_hpc`, not the realm-hpc script: a GPU image runs the checkout on PYTHONPATH, not installed
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "realm_hpc", *PRETRAIN[:3], "--steps", "12",
                           "--out", str(out), *PRETRAIN[5:], "--set", "refresh.mode=mpi",
                           "--set", "train.device=cuda", "--set", "refresh.device=cuda"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refresh_mode"] == "mpi" and summary["index_versions"] >= 2, summary


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (two trainers over nccl)")
def test_two_trainers_over_nccl_with_a_sharded_index(tmp_path):
    """torchrun, 2 trainers on 2 GPUs: nccl collectives, the DeepSpeed engine, the sharded index's all-gathers."""
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([str(bin_dir / "torchrun"), "--nproc-per-node", "2", "-m", "realm_hpc", *PRETRAIN,
                           "--out", str(out), "--set", "train.device=cuda", "--set", "index.sharded=true"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainers"] == 2 and summary["index_sharded"] is True and summary["steps"] == 8
    assert np.all(np.isfinite(_losses(out)))


def test_deterministic_runs_and_a_resume_give_the_same_losses_on_cuda(tmp_path):
    """train.deterministic=true on the GPU: two runs of the same config log the same losses bit for bit, and a run
    stopped at step 4 and resumed logs the uninterrupted run's. Fresh processes: the launch sets
    CUBLAS_WORKSPACE_CONFIG before CUDA initialises."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    det = ["--set", "train.device=cuda", "--set", "train.deterministic=true"]  # dropout on: its CUDA RNG too

    def pretrain(out: Path, *extra) -> None:
        proc = subprocess.run([sys.executable, "-m", "realm_hpc", *PRETRAIN[:3], "--out", str(out), *PRETRAIN[3:],
                               *det, *extra], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "warning: train.deterministic set after CUDA" not in proc.stderr

    pretrain(tmp_path / "a")
    pretrain(tmp_path / "b")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 8
    pretrain(tmp_path / "c", "--steps", "4")
    proc = subprocess.run([sys.executable, "-m", "realm_hpc", "pretrain", "--out", str(tmp_path / "c"), "--resume",
                           "--steps", "8"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path / "c") == _losses(tmp_path / "a")


def test_finetune_on_cuda(gpu_run, tmp_path):
    out = tmp_path / "ft"
    main(["finetune", "--recipe", "qa-tiny", "--pretrained", str(gpu_run), "--out", str(out),
          "--set", "qa.steps=6", "--set", "qa.eval_every=3", "--set", "qa.checkpoint_every=3",
          "--set", "qa.log_every=1", "--set", "train.device=cuda"])
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["dev_em"] <= 1.0 and "dev_em_closed_book" in summary
    assert len(_losses(out)) == 6 and np.all(np.isfinite(_losses(out)))
    # evaluate --qa loads the GPU-written checkpoint (on the CPU) into the run's device: the run's own numbers
    main(["evaluate", "--run", str(out), "--qa", str(out / "qa" / "dev.jsonl")])
    result = json.loads((out / "eval" / "dev.json").read_text())
    assert result["em"] == pytest.approx(summary["dev_em"])
