"""index.sharded: two trainers (mpiexec -n 2, gloo group from the MPI communicator) each hold half of the index;
their merged top-k must be the top-k of one exact search over the whole index, exclusions and ties included."""

import subprocess
import sys
import textwrap

import pytest

from test_mpi_refresh import MPIEXEC, TIMEOUT_S, _env  # same directory (pytest puts it on sys.path)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")]

SCRIPT = textwrap.dedent("""
    import torch
    from mpi4py import MPI

    import kernels
    from realm_hpc.dist import init_trainer_group
    from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex
    from realm_hpc.retrieval.sharded import ShardedIndex, full_embeddings, index_from_full

    group = init_trainer_group(MPI.COMM_WORLD)
    assert group.size == 2, group
    g = torch.Generator().manual_seed(0)
    N, P, k = 101, 16, 8
    # Small integers: every score is exact in float32, so equal scores are real ties (broken to the lower id).
    full = torch.randint(-3, 4, (N, P), generator=g).float()
    full[60] = full[7]  # a tie across the two shards (rows 0-49 | 50-100)
    full[8] = full[7]
    queries = torch.randint(-3, 4, (24, P), generator=g).float()
    queries[3] = full[7]
    exclude = torch.randint(0, N, (24,), generator=g)
    exclude[::5] = -1
    exclude[3] = 7  # excluded: its twins 8 and 60 must still come back

    sharded = index_from_full(full, 1, 0, group, sharded=True)
    assert isinstance(sharded, ShardedIndex) and sharded.snapshot.embeddings.shape[0] in (50, 51)
    replicated = LiveIndex(IndexSnapshot(full, 1, 0))
    # Each trainer asks its own queries (different counts), as in training with uneven data.
    mine = slice(0, 10) if group.rank == 0 else slice(10, 24)
    s_scores, s_ids = sharded.search(queries[mine], k, exclude[mine])
    r_scores, r_ids = replicated.search(queries[mine], k, exclude[mine])
    e_scores, e_ids = kernels.ip_topk(queries[mine], full, k, exclude[mine])
    assert torch.equal(s_ids, e_ids) and torch.equal(r_ids, e_ids), (s_ids, e_ids)
    assert torch.equal(s_scores, e_scores)
    if group.rank == 0:
        assert s_ids[3, :2].tolist() == [8, 60], s_ids[3]
    # Without exclusions too, and the gather back to N rows for a checkpoint.
    s2, i2 = sharded.search(queries[mine], k)
    assert torch.equal(i2, kernels.ip_topk(queries[mine], full, k)[1])
    assert torch.equal(full_embeddings(sharded), full)
    # A frozen doc encoder's top-k rows read from the index (each trainer asks for its own ids, any shard's).
    ids = e_ids if group.rank == 0 else e_ids[:, :3]
    assert torch.equal(sharded.embeddings_of(ids), full[ids]) and torch.equal(replicated.embeddings_of(ids), full[ids])
    print(f"OK rank {group.rank}", flush=True)
    torch.distributed.destroy_process_group()  # gloo aborts at exit with a live group
""")


def test_sharded_topk_equals_one_exact_search(tmp_path):
    pytest.importorskip("mpi4py")
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("OK rank") == 2, proc.stdout
