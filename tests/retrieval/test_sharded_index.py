"""index.sharded: two trainers (mpiexec -n 2, gloo group from the MPI communicator) each hold half of the index;
their merged top-k must be the top-k of one exact search over the whole index, exclusions and ties included, in
float32 and bf16, and past 2**24 rows; a new version reaches each trainer as its own rows only."""

import subprocess
import sys
import textwrap

import pytest

from test_mpi_refresh import MPIEXEC, TIMEOUT_S, _env  # same directory (pytest puts it on sys.path)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")]

SCRIPT = textwrap.dedent("""
    import torch
    from mpi4py import MPI
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import kernels
    from realm_hpc.dist import init_trainer_group
    from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex
    from realm_hpc.retrieval.sharded import ShardedIndex, full_embeddings, index_from_full, swap_from_trainer0

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

    class LargestTensor(TorchDispatchMode):  # the most rows of any 2-d tensor an op makes while it is on

        def __init__(self):
            super().__init__()
            self.rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    self.rows = max(self.rows, t.shape[0])
            return out

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
    # Without exclusions too.
    s2, i2 = sharded.search(queries[mine], k)
    assert torch.equal(i2, kernels.ip_topk(queries[mine], full, k)[1])
    # The gather back to N rows for a checkpoint: trainer 0 alone gets them, the others never hold more than a shard.
    seen = LargestTensor()
    with seen:
        gathered = full_embeddings(sharded)
    assert torch.equal(gathered, full) if group.rank == 0 else gathered is None
    assert group.rank == 0 or seen.rows <= (N + 1) // 2, seen.rows

    # A frozen doc encoder's top-k rows read from the index (each trainer asks for its own ids, any shard's).
    ids = e_ids if group.rank == 0 else e_ids[:, :3]
    assert torch.equal(sharded.embeddings_of(ids), full[ids]) and torch.equal(replicated.embeddings_of(ids), full[ids])

    # index.live_dtype=bf16: small integers are exact in bf16 too, so the ids are the float32 search's.
    half = index_from_full(full, 1, 0, group, sharded=True, dtype=torch.bfloat16)
    assert half.snapshot.embeddings.dtype == torch.bfloat16
    h_scores, h_ids = half.search(queries[mine], k, exclude[mine])
    assert torch.equal(h_ids, e_ids) and torch.equal(h_scores, e_scores), (h_ids, e_ids)

    # A new version from trainer 0 (the refreshers' rows arrive there): every trainer swaps in its own rows, and no
    # op on any trainer makes a tensor of more than a shard's rows. The replicated index, as the control, does.
    new = 2 * full + 1
    shard_rows = (N + 1) // 2
    for index in (sharded, half, replicated):
        seen = LargestTensor()
        with seen:
            swap_from_trainer0(index, new if group.rank == 0 else None, 2, 5, N, P, group)
        assert index.version == 2 and index.snapshot.weights_step == 5
        if index is replicated:
            assert torch.equal(index.snapshot.embeddings, new)
            assert group.rank == 0 or seen.rows == N, seen.rows  # the check sees a full-size receive buffer
        else:
            rows = index.rows
            assert torch.equal(index.snapshot.embeddings, new[rows.start:rows.stop].to(index.dtype))
            assert seen.rows <= shard_rows, (seen.rows, shard_rows)
    assert half.snapshot.embeddings.dtype == torch.bfloat16
    assert torch.equal(sharded.search(queries[mine], k, exclude[mine])[1],
                       kernels.ip_topk(queries[mine], new, k, exclude[mine])[1])
    print(f"OK rank {group.rank}", flush=True)
    torch.distributed.destroy_process_group()  # gloo aborts at exit with a live group
""")


# Past 2**24 rows (DPR's 21M passages are past it): ids that a float32 cannot hold (2**24 + 1 rounds to 2**24) must
# come back exact. D = 4 keeps the index at 256 MiB; rank 0 alone builds all of it for the exact search, rank 1 only
# its half. Rows are small integers (exact scores: ties are real and go to the lower id, across the shards too).
BIG_SCRIPT = textwrap.dedent("""
    import torch
    from mpi4py import MPI

    import kernels
    from realm_hpc.dist import init_trainer_group
    from realm_hpc.retrieval.index import IndexSnapshot, shard_range
    from realm_hpc.retrieval.sharded import ShardedIndex

    group = init_trainer_group(MPI.COMM_WORLD)
    assert group.size == 2, group
    N, P, k, TOP = 2 ** 24 + 64, 4, 8, 2 ** 24  # rows TOP.. hold the planted ones
    g = torch.Generator().manual_seed(0)
    planted = torch.randint(-3, 4, (N - TOP, P), generator=g).float()
    # Three twins that outscore every other row for a query along them: ids 2**24 + 1 and + 2 tie (as float32 ids
    # they would read 2**24 and 2**24 + 2), then + 7 (a float32 reads 2**24 + 8).
    planted[[1, 2, 7]] = 30.0

    patterns = torch.randint(-3, 4, (7, P), generator=g).float()

    def rows_of(rows: range) -> torch.Tensor:
        # Row i is patterns[i % 7] (a repeat, cheap at this size), unless planted.
        first = patterns[(rows.start + torch.arange(7)) % 7]
        out = first.repeat(-(-len(rows) // 7), 1)[:len(rows)]
        lo = max(rows.start, TOP)
        if lo < rows.stop:
            out[lo - rows.start:] = planted[lo - TOP:rows.stop - TOP]
        return out

    queries = torch.cat([planted[1:2], planted[1:2], torch.randint(-3, 4, (2, P), generator=g).float()])
    exclude = torch.tensor([-1, TOP + 1, 5, TOP + 2])
    rows = shard_range(N, 2, group.rank)
    if group.rank == 0:
        full = rows_of(range(N))
        index = ShardedIndex(IndexSnapshot(full[rows.start:rows.stop], 1, 0), rows, N, group)
        e_scores, e_ids = kernels.ip_topk(queries, full, k, exclude)
        del full
    else:
        index = ShardedIndex(IndexSnapshot(rows_of(rows), 1, 0), rows, N, group)
        e_scores, e_ids = torch.empty(len(queries), k), torch.empty(len(queries), k, dtype=torch.long)
    torch.distributed.broadcast(e_scores, src=0)
    torch.distributed.broadcast(e_ids, src=0)
    s_scores, s_ids = index.search(queries, k, exclude)
    assert torch.equal(s_ids, e_ids) and torch.equal(s_scores, e_scores), (s_ids, e_ids)
    assert s_ids[0, :3].tolist() == [TOP + 1, TOP + 2, TOP + 7], s_ids[0]
    assert s_ids[1, :2].tolist() == [TOP + 2, TOP + 7], s_ids[1]
    # Random queries tie among the 7 patterns: the lower ids (shard 0) win over shard 1's twins.
    assert (s_ids[2:] < N // 2).any(), s_ids[2:]
    print(f"OK rank {group.rank}", flush=True)
    torch.distributed.destroy_process_group()
""")


def _run_two_trainers(tmp_path, script_text: str) -> None:
    pytest.importorskip("mpi4py")
    script = tmp_path / "sharded.py"
    script.write_text(script_text)
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("OK rank") == 2, proc.stdout


def test_sharded_topk_equals_one_exact_search(tmp_path):
    _run_two_trainers(tmp_path, SCRIPT)


def test_sharded_search_past_2_pow_24_rows_equals_one_exact_search(tmp_path):
    _run_two_trainers(tmp_path, BIG_SCRIPT)
