"""Several trainers: MPI trainers + refresher ranks, torchrun trainers, and rank-count independence of the loss.

Each run is a real multi-process launch of the CLI on a cut-down tiny recipe (~15-40 s each on 2 busy cores).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from realm_hpc.metrics import read_metrics

VENV_BIN = Path(sys.executable).parent
MPIEXEC = (VENV_BIN / "mpiexec") if (VENV_BIN / "mpiexec").exists() else shutil.which("mpiexec")
TORCHRUN = (VENV_BIN / "torchrun") if (VENV_BIN / "torchrun").exists() else shutil.which("torchrun")
REALM = [sys.executable, "-m", "realm_hpc"]
TIMEOUT_S = 400
SMALL = ["--recipe", "tiny", "--set", "ict.steps=10", "--set", "ict.eval_every=10", "--set", "train.log_every=1",
         "--set", "train.eval_every=1000", "--set", "train.checkpoint_every=1000", "--set", "data.eval_examples=30"]

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    env.pop("TRITON_INTERPRET", None)  # the CPU path runs the torch references
    return env


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd[0]} timed out after {TIMEOUT_S} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def _step_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich mpi4py)")
@pytest.mark.parametrize("ranks,refreshers", [(3, 1), (4, 2)], ids=["2-trainers-1-refresher", "2-trainers-2-refreshers"])
def test_mpi_trainers_with_refresher_ranks(tmp_path, ranks, refreshers):
    pytest.importorskip("mpi4py")
    out, steps = tmp_path / "run", 16
    _run([MPIEXEC, "-n", ranks, *REALM, "pretrain", "--out", out, "--steps", steps, "--refreshers", refreshers,
          *SMALL, "--set", "refresh.mode=mpi", "--set", "refresh.every=3", "--set", "train.reader_warmup_steps=4",
          "--deepspeed-config", Path(__file__).parents[1] / "configs" / "ds_zero2.json"], cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainers"] == ranks - refreshers and summary["steps"] == steps
    assert summary["recall_at_8_after_ict"] > summary["recall_at_8_start"]
    rows = _step_rows(out)
    assert len(rows) == steps and all(math.isfinite(r["loss"]) for r in rows)
    versions = [r["index_version"] for r in rows]
    assert versions == sorted(versions) and versions[-1] >= 3, versions
    # Every swapped-in version was encoded by all refreshers, each exactly its own slice: the shards tile [0, N).
    swaps = [r["refresh_shards"] for r in rows if "refresh_shards" in r]
    assert len(swaps) == summary["index_versions"] - 1 >= 2
    for shards in swaps:
        assert len(shards) == refreshers
        bounds = sorted((a, b) for a, b, _ in shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == summary["corpus_docs"]
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:])), bounds
        assert all(docs_per_s > 0 for *_, docs_per_s in shards)
    assert all(0 <= r["wait_share"] < 1 for r in rows)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_one_and_two_trainers_give_the_same_losses(tmp_path):
    """Same seed, same global batch, dropout off: 1 trainer (DeepSpeed, world 1) and 2 torchrun trainers (each half
    the batch, a sharded index, inline refresh split across them) must log the same loss at every step."""
    steps = 20
    common = [*SMALL, "--steps", steps, "--set", "model.dropout=0", "--set", "refresh.every=5",
              "--set", "train.reader_warmup_steps=6",
              "--deepspeed-config", Path(__file__).parents[1] / "configs" / "ds_zero1.json"]
    _run([*REALM, "pretrain", "--out", tmp_path / "one", *common], cwd=tmp_path)
    _run([TORCHRUN, "--nproc-per-node", 2, "-m", "realm_hpc", "pretrain", "--out", tmp_path / "two", *common,
          "--set", "index.sharded=true"], cwd=tmp_path)
    one, two = _step_rows(tmp_path / "one"), _step_rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) == steps
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), (a["step"], a["loss"], b["loss"])
        assert a["index_version"] == b["index_version"]
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["trainers"] == 2 and s2["index_sharded"] is True and "trainers" not in s1
    assert s2["recall_at_8"] == pytest.approx(s1["recall_at_8"], abs=1e-9)
