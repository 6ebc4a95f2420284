"""The MPI refresher under a real `mpiexec -n 2`: the protocol on its own, then the whole CLI path."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
MPIEXEC = (VENV_BIN / "mpiexec") if (VENV_BIN / "mpiexec").exists() else shutil.which("mpiexec")
TIMEOUT_S = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich mpi4py)"),
]


def _env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    env.pop("TRITON_INTERPRET", None)  # the CPU path runs the torch reference; no need to load Triton
    return env


def _mpiexec(args: list[str], cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    pytest.importorskip("mpi4py")
    try:
        return subprocess.run([str(MPIEXEC), "-n", str(ranks), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec timed out after {TIMEOUT_S} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")


SCRIPT = textwrap.dedent("""
    import sys, time

    import torch
    from mpi4py import MPI

    from realm_hpc.config import ModelConfig
    from realm_hpc.data.blocks import BlockStore
    from realm_hpc.models.encoders import Encoder
    from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex, encode_blocks
    from realm_hpc.retrieval.refresh import MPIRefresher, serve_refresher

    STORE, BATCH = sys.argv[1], 8
    cfg = ModelConfig(hidden=32, layers=1, heads=2, intermediate=64, proj_dim=16, pooling="mean", block_len=64)
    comm = MPI.COMM_WORLD
    refreshers = list(range(1, comm.Get_size()))  # rank 0 trains, every other rank re-encodes its shard

    def make_encoder(run_dir):
        blocks = BlockStore.open(run_dir)
        torch.manual_seed(1)  # different initial weights from rank 0's: the message must replace them all
        return Encoder(cfg, blocks.meta["vocab_size"], cfg.block_len), blocks, BATCH

    if comm.Get_rank() > 0:
        serve_refresher(comm, trainer=0, shard_index=comm.Get_rank() - 1, n_shards=len(refreshers),
                        make_encoder=make_encoder)
        sys.exit(0)

    blocks = BlockStore.open(STORE)
    torch.manual_seed(0)
    encoder = Encoder(cfg, blocks.meta["vocab_size"], cfg.block_len)
    old = encode_blocks(encoder, blocks, BATCH)
    live = LiveIndex(IndexSnapshot(old, 1, 0))
    refresher = MPIRefresher(comm, refreshers, len(blocks), cfg.proj_dim, every=5, run_dir=STORE)

    with torch.no_grad():  # "training" moved the doc encoder
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = encode_blocks(encoder, blocks, BATCH)

    step, sent_at, calls, deadline = 1, None, 0, time.time() + 120
    while True:
        event = refresher.step_boundary(step, encoder, live)
        calls += 1
        if event.swapped:
            break  # (the same boundary may already send the next snapshot: that one is allowed)
        if event.sent:
            assert sent_at is None, "a second refresh was sent before the first landed"
            sent_at = step
        assert time.time() < deadline, "no swap within 120 s"
        time.sleep(0.01)
        step += 1
    refresher.close()

    # the first snapshot waits `every` steps past the weights of the live index; it lands at a later boundary
    assert sent_at == 5 and calls >= 6, (sent_at, calls)
    assert live.version == 2, live.version
    assert live.snapshot.weights_step == sent_at
    got = live.snapshot.embeddings
    assert got.shape == expected.shape == (len(blocks), cfg.proj_dim)
    err = (got - expected).abs().max().item()
    assert err <= 1e-5, err
    assert (got - old).abs().max().item() > 1e-2  # the index really changed
    print(f"OK calls={calls} max_err={err:.2e}", flush=True)
""")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from realm_hpc.data.blocks import BlockStore
    from realm_hpc.data.tokenizer import train_wordpiece
    from realm_hpc.data.world import build_world

    root = tmp_path_factory.mktemp("mpi_store")
    world = build_world(people=20, orgs=4, cities=4, surnames=5, heldout_facts=5, seed=0)
    tokenizer = train_wordpiece([f"{d.title} {d.text}" for d in world.docs], 200, root / "tokenizer")
    BlockStore.build(world.docs, tokenizer, root / "blocks", max_len=64)
    return root / "blocks"


@pytest.mark.parametrize("ranks", [2, 3], ids=["1-refresher", "2-refreshers"])
def test_mpi_refresher_swaps_in_the_index_of_the_new_weights(store, tmp_path, ranks):
    """With M refreshers each encodes its slice once; the assembled index must equal one full local encode."""
    script = tmp_path / "refresh_pair.py"
    script.write_text(SCRIPT)
    proc = _mpiexec([sys.executable, str(script), str(store)], cwd=tmp_path, ranks=ranks)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "OK" in proc.stdout, proc.stdout


@pytest.mark.parametrize("refreshers", [1, 2])
def test_cli_pretrain_with_mpi_refreshers(tmp_path, refreshers):
    out = tmp_path / "run"
    steps = 20
    args = ["realm-hpc", "pretrain", "--recipe", "tiny", "--out", str(out), "--steps", str(steps),
            "--refreshers", str(refreshers),
            "--set", "refresh.mode=mpi", "--set", "refresh.every=5", "--set", "ict.steps=10",
            "--set", "train.reader_warmup_steps=5", "--set", "train.log_every=1", "--set", "train.eval_every=1000",
            "--set", "train.checkpoint_every=1000"]
    proc = _mpiexec(args, cwd=tmp_path, ranks=1 + refreshers)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["refresh_mode"] == "mpi" and summary["steps"] == steps
    assert summary["index_versions"] >= 3, summary

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [summary["ict_steps"] + s for s in range(1, steps + 1)]
    versions = [r["index_version"] for r in step_rows]
    assert versions == sorted(versions), versions
    assert versions[0] <= 2 and versions[-1] >= 3, versions
    assert versions[-1] == summary["index_versions"]
    # Versions change while training goes on: the swaps land between steps, not at the end.
    first_v3 = next(i for i, v in enumerate(versions) if v >= 3)
    assert first_v3 < len(versions) - 1, versions
    refreshes = [r["step"] for r in rows if r.get("event") == "refresh"]
    assert len(refreshes) == summary["index_versions"] - 1
    assert max(r["staleness"] for r in step_rows) == summary["max_staleness_steps"]
