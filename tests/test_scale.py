"""Several trainers: MPI trainers + refresher ranks, torchrun trainers, and rank-count independence of the loss.

Each run is a real multi-process launch of the CLI on a cut-down tiny recipe (~15-40 s each on 2 busy cores).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from realm_hpc.metrics import read_metrics

VENV_BIN = Path(sys.executable).parent
MPIEXEC = (VENV_BIN / "mpiexec") if (VENV_BIN / "mpiexec").exists() else shutil.which("mpiexec")
TORCHRUN = (VENV_BIN / "torchrun") if (VENV_BIN / "torchrun").exists() else shutil.which("torchrun")
REALM = [sys.executable, "-m", "realm_hpc"]
TIMEOUT_S = 400
SMALL = ["--recipe", "tiny", "--set", "ict.steps=10", "--set", "ict.eval_every=10", "--set", "train.log_every=1",
         "--set", "train.eval_every=1000", "--set", "train.checkpoint_every=1000",
         "--set", "data.world_people=60", "--set", "data.world_orgs=12", "--set", "data.world_cities=8",
         "--set", "data.world_surnames=10", "--set", "data.heldout_facts=40", "--set", "data.eval_examples=20",
         # 40 held-out facts: 20 test examples, 40 dev ones for ICT's recall to rise measurably on.
         # Losses are compared across trainer counts: on a one-GPU machine train.device=auto would put a lone trainer
         # on the GPU and two on the CPU (nccl needs a GPU each).
         "--set", "train.device=cpu"]

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
@pytest.mark.parametrize("ranks,refreshers,index", [(3, 1, []), (4, 2, ["index.sharded=true", "index.live_dtype=bf16"])],
                         ids=["2-trainers-1-refresher", "2-trainers-2-refreshers-sharded-bf16"])
def test_mpi_trainers_with_refresher_ranks(tmp_path, ranks, refreshers, index):
    """Replicated: trainer 0 broadcasts each new version; sharded: it sends each trainer its rows (in bf16 here)."""
    pytest.importorskip("mpi4py")
    out, steps = tmp_path / "run", 16
    _run([MPIEXEC, "-n", ranks, *REALM, "pretrain", "--out", out, "--steps", steps, "--refreshers", refreshers,
          *SMALL, "--set", "refresh.mode=mpi", "--set", "refresh.every=3", "--set", "train.reader_warmup_steps=4",
          "--set", "refresh.max_staleness=2", *(a for kv in index for a in ("--set", kv)),
          "--deepspeed-config", Path(__file__).parents[1] / "configs" / "ds_zero2.json"], cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainers"] == ranks - refreshers and summary["steps"] == steps
    assert summary["index_sharded"] is bool(index)
    assert summary["dev_recall_at_8_after_ict"] > summary["dev_recall_at_8_start"]
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
    # refresh.max_staleness=2 < refresh.every: every version outlives it, once per version a warning is logged.
    warned = [r for r in rows if r.get("stale_warning")]
    assert 1 <= len(warned) <= summary["index_versions"]
    assert all(r["staleness"] > 2 for r in warned)


STEPS_1V2 = 20
COMMON_1V2 = [*SMALL, "--steps", STEPS_1V2, "--set", "model.dropout=0", "--set", "refresh.every=5",
              "--set", "train.reader_warmup_steps=6", "--set", "train.checkpoint_every=5",
              "--deepspeed-config", Path(__file__).parents[1] / "configs" / "ds_zero1.json"]


def _torchrun(out: Path, *extra) -> list:
    return [TORCHRUN, "--nproc-per-node", 2, "-m", "realm_hpc", "pretrain", "--out", out, *extra]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """Same seed, same global batch, dropout off: 1 trainer (DeepSpeed, world 1) and 2 torchrun trainers (each half
    the batch, a sharded index, inline refresh split across them)."""
    if TORCHRUN is None:
        pytest.skip("torchrun not found")
    root = tmp_path_factory.mktemp("one_two")
    _run([*REALM, "pretrain", "--out", root / "one", *COMMON_1V2], cwd=root)
    _run(_torchrun(root / "two", *COMMON_1V2, "--set", "index.sharded=true"), cwd=root)
    return root / "one", root / "two"


def test_one_and_two_trainers_give_the_same_losses(one_and_two):
    one_dir, two_dir = one_and_two
    one, two = _step_rows(one_dir), _step_rows(two_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) == STEPS_1V2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), (a["step"], a["loss"], b["loss"])
        assert a["index_version"] == b["index_version"]
    s1 = json.loads((one_dir / "summary.json").read_text())
    s2 = json.loads((two_dir / "summary.json").read_text())
    assert s2["trainers"] == 2 and s2["index_sharded"] is True and "trainers" not in s1
    assert s2["test_recall_at_8"] == pytest.approx(s1["test_recall_at_8"], abs=1e-9)


def test_pca_projection_is_the_same_for_one_and_two_trainers(tmp_path):
    """model.proj_init=pca with 2 trainers: each encodes half the corpus, the pooled vectors are all-gathered and
    trainer 0's directions broadcast; the start index, its recall and the losses are a lone trainer's."""
    if TORCHRUN is None:
        pytest.skip("torchrun not found")
    pca = [*SMALL, "--steps", 4, "--set", "ict.steps=0", "--set", "model.proj_init=pca", "--set", "model.proj_dim=32",
           "--set", "model.normalize=true", "--set", "model.dropout=0", "--set", "train.reader_warmup_steps=2",
           "--set", "refresh.every=1000", "--set", "eval.closed_book_baseline=false"]
    _run([*REALM, "pretrain", "--out", tmp_path / "one", *pca], cwd=tmp_path)
    _run(_torchrun(tmp_path / "two", *pca, "--set", "index.sharded=true"), cwd=tmp_path)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["trainers"] == 2
    for key in ("test_recall_at_8_start", "test_span_in_top_8_start", "dev_recall_at_8_start"):
        assert s2[key] == pytest.approx(s1[key], abs=1e-9), key
    one, two = _step_rows(tmp_path / "one"), _step_rows(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), (a["step"], a["loss"], b["loss"])


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_kill_9_of_a_trainer_then_resume_gives_the_same_losses(one_and_two, tmp_path):
    """A trainer SIGKILLed mid-run (after the step-10 checkpoint): the relaunch with --resume continues from the
    DeepSpeed checkpoint + state.pt and logs the losses of the uninterrupted 2-trainer run."""
    _, reference = one_and_two
    out = tmp_path / "killed"
    ict_steps = json.loads((reference / "summary.json").read_text())["ict_steps"]
    launcher = subprocess.Popen([str(c) for c in _torchrun(out, *COMMON_1V2, "--set", "index.sharded=true")],
                                cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while not any(r["step"] >= ict_steps + 12 for r in _rows_if_any(out)):
            assert launcher.poll() is None, f"the run ended before the kill:\n{launcher.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no step 12 in time"
            time.sleep(0.2)
        trainers = _children(launcher.pid)
        assert len(trainers) == 2, trainers
        os.kill(trainers[-1], signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    killed_at = max(r["step"] for r in _step_rows(out))
    assert killed_at < ict_steps + STEPS_1V2
    _run(_torchrun(out, "--resume"), cwd=tmp_path)
    ref, resumed = _step_rows(reference), _step_rows(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in ref]  # nothing lost, nothing logged twice
    for a, b in zip(ref, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["index_version"] == b["index_version"]
    assert len(list((out / "deepspeed").glob("step*"))) == 1  # older DeepSpeed tags pruned after each commit


def _rows_if_any(run: Path) -> list[dict]:
    try:
        return [r for r in read_metrics(run) if "loss" in r]
    except FileNotFoundError:
        return []


# -- Open-QA fine-tuning on several trainers -------------------------------------------------------------------------
FT_STEPS = 6
FT_COMMON = ["finetune", "--recipe", "qa-tiny", "--set", "qa.log_every=1", "--set", "qa.eval_every=1000",
             "--set", "qa.checkpoint_every=1000", "--set", "qa.closed_book_baseline=false",
             "--set", "qa.dev_fraction=0.02", "--set", "qa.test_fraction=0.02"]


@pytest.fixture(scope="module")
def ft_one_and_two(tmp_path_factory, small_world):
    """A tiny pretraining without dropout (a fine-tune keeps the pretrained model settings), then the same fine-tune
    on 1 trainer (plain AdamW, FT_STEPS steps) and on 2 MPI trainers (DeepSpeed ZeRO-2, half of the steps: the
    resume test continues it)."""
    from realm_hpc.cli import main
    from test_finetune_e2e import PRETRAIN

    if MPIEXEC is None:
        pytest.skip("mpiexec not found (pip install mpich mpi4py)")
    root = tmp_path_factory.mktemp("ft_one_two")
    pre, one, two = root / "pretrain", root / "one", root / "two"
    t0 = time.perf_counter()
    main([*PRETRAIN, "--set", "model.dropout=0", *(a for kv in small_world for a in ("--set", kv)), "--out", str(pre)])
    main([*FT_COMMON, "--pretrained", str(pre), "--out", str(one), "--set", f"qa.steps={FT_STEPS}"])
    _run([MPIEXEC, "-n", 2, *REALM, *FT_COMMON, "--pretrained", pre, "--out", two,
          "--set", f"qa.steps={FT_STEPS // 2}"], cwd=root)
    print(f"\npretrain + 1-trainer and 2-trainer fine-tunes: {time.perf_counter() - t0:.1f} s")
    return one, two


def _ft_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_finetune_one_and_two_trainers_give_the_same_losses(ft_one_and_two):
    one, two = ft_one_and_two
    a, b = _ft_losses(one), _ft_losses(two)
    assert list(b) == list(range(1, FT_STEPS // 2 + 1))
    assert any(a[s] > 0 for s in b), a  # some questions of these steps have their answer in the top-k
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
    summary = json.loads((two / "summary.json").read_text())
    assert summary["trainers"] == 2 and summary["steps"] == FT_STEPS // 2 and "dev_em" in summary
    assert (two / "eval" / "dev.predictions.jsonl").is_file()
    assert list((two / "deepspeed").glob("step*")) == [two / "deepspeed" / f"step{FT_STEPS // 2}"]


def test_finetune_resume_under_two_trainers(ft_one_and_two):
    """--resume on 2 trainers continues from the DeepSpeed checkpoint with the 1-trainer run's losses."""
    one, two = ft_one_and_two
    _run([MPIEXEC, "-n", 2, *REALM, "finetune", "--out", two, "--resume", "--set", f"qa.steps={FT_STEPS}"],
         cwd=two.parent)
    a, b = _ft_losses(one), _ft_losses(two)
    assert list(b) == list(a) == list(range(1, FT_STEPS + 1))  # nothing lost, nothing logged twice
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
    assert json.loads((two / "summary.json").read_text())["steps"] == FT_STEPS
    assert [p.name for p in (two / "deepspeed").glob("step*")] == [f"step{FT_STEPS}"]
