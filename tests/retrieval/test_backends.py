"""Every index backend returns the exact answer (flat) or the configured recall (IVF-PQ + refine), honours the
trivial-retrieval exclusion and always returns k results.

``exact`` is compared with kernels.ip_topk: id for id on integer-valued data (every score exact, so ties are real
and must go to the lower id), and up to near-ties on float data (a different summation order may swap two scores
within rounding of each other, as Triton vs the reference may). Its CPU search is forced down each of its paths
(faiss per-query loop, faiss BLAS, torch slab filter; 1 to 3 shards). Small sizes: the whole file takes a few s.
"""

import importlib.util

import pytest
import torch

import kernels
from realm_hpc.retrieval.backends import build_backend, recall_at_k

K = 8
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")


def _data(n, d, integer, seed=0):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: every dot product is exact in float32, so ties are exact and plentiful
        return torch.randint(-2, 3, (n, d), generator=g).float()
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _clustered(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(max(1, int(n ** 0.5)), d, generator=g), dim=1)
    x = centres[torch.randint(len(centres), (n,), generator=g)] + 0.7 / d ** 0.5 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _exclude(b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    ex = torch.randint(n, (b,), generator=g)
    ex[::3] = -1  # -1 = nothing excluded for that query
    return ex


def assert_same_topk(got, ref, q, x, exact_ids: bool):
    (s, i), (rs, ri) = got, ref
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and i.shape == ri.shape
    torch.testing.assert_close(s, rs, atol=1e-5, rtol=1e-5)
    if exact_ids:
        assert torch.equal(i, ri)
        return
    # where ids differ, the two docs' true scores must agree to rounding: a near-tie, not a miss
    differ = i != ri
    true = torch.einsum("bd,bkd->bk", q.double(), x.double()[i])
    true_ref = torch.einsum("bd,bkd->bk", q.double(), x.double()[ri])
    assert ((true - true_ref).abs()[differ] < 1e-5).all()


def assert_excluded_and_full(ids, exclude, k):
    assert ids.shape[1] == k
    assert (ids >= 0).all()
    if exclude is not None:
        assert not (ids == exclude[:, None]).any()
    assert all(len(set(row)) == k for row in ids.tolist())


# exact: (B, build params) that drive each CPU path; D=32 so B=4000 crosses faiss's BLAS threshold (B * D >= 128000).
# small_work=0 keeps the shards at this size (the caller's thread takes the first faiss shard, workers the rest);
# team_bytes=0 keeps this small index off the one-team faiss search; bf16_filter=False keeps the float32 paths on
# CPUs that multiply bfloat16, and bf16_filter=True drives the bfloat16 filter on any CPU (torch converts).
F32 = dict(bf16_filter=False)
BF16 = dict(bf16_filter=True, bf16_batches=[1, 10**9])
PATHS = {
    "faiss-team": (5, dict(threads=2, min_shard_rows=64, small_work=0, **F32)),
    "faiss-team-beyond-team-bytes": (5, dict(threads=2, min_shard_rows=64, small_work=0, team_bytes=0, **F32)),
    "faiss-loop-2-shards-b1": (1, dict(threads=2, min_shard_rows=64, small_work=0, team_bytes=0, **F32)),
    "faiss-blas-2-shards": (4000, dict(threads=2, min_shard_rows=64, small_work=0, **F32)),
    "faiss-one-job-in-caller": (1, dict(threads=2, min_shard_rows=64, **F32)),
    "torch-slab-3-shards": (37, dict(threads=3, min_shard_rows=64, small_batch=1, chunk_elems=4096, small_work=0,
                                     team_bytes=0, **F32)),
    "torch-slab-1-shard-b1": (1, dict(threads=1, small_batch=1, chunk_elems=4096, **F32)),
    "bf16-team": (37, dict(threads=2, bf16_team=True, chunk_elems=4096, **BF16)),  # slab maxima (B >= 32)
    "bf16-team-heap": (9, dict(threads=2, bf16_team=True, chunk_elems=4096, **BF16)),
    "bf16-3-shards": (37, dict(threads=3, min_shard_rows=64, small_work=0, bf16_team=False, chunk_elems=4096,
                               **BF16)),
    "reference": (7, dict(cpu_path="reference")),
}


@pytest.mark.parametrize("integer", [True, False], ids=["integer-ties", "float"])
@pytest.mark.parametrize("path", [pytest.param(p, marks=needs_faiss) if "faiss" in p or "bf16" in p else p
                                  for p in PATHS])
def test_exact_matches_ip_topk(path, integer):
    n, d = 3001, 32
    b, params = PATHS[path]
    x = _data(n, d, integer)
    q = _data(b, d, integer, seed=2)
    backend = build_backend("exact", x, **params)
    if "faiss" in path:
        assert backend._cpu.method(b) == ("faiss-team" if "team" in path else "faiss")
    if "bf16" in path:
        assert backend._cpu.method(b) == "bf16"
    if "torch" in path:
        assert backend._cpu.method(b) == "torch"
    for k, ex in [(1, None), (K, None), (K, _exclude(b, n)), (70, _exclude(b, n))]:
        got = backend.search(q, k, ex)
        assert_same_topk(got, kernels.ip_topk(q, x, k, ex), q, x, exact_ids=integer)
        assert_excluded_and_full(got[1], ex, k)


@needs_faiss
@pytest.mark.parametrize("integer", [True, False], ids=["integer-ties", "float"])
def test_exact_faiss_shards_shorter_than_k(integer):
    """Two 70-row shards and k = 70: faiss returns every row of a shard, and a row that excludes one of them holds
    only 69; the merge must still give the reference's 70 of 139."""
    n, d, b = 140, 32, 5
    x, q = _data(n, d, integer), _data(b, d, integer, seed=2)
    backend = build_backend("exact", x, threads=2, min_shard_rows=64, small_work=0, team_bytes=0, **F32)
    assert backend._cpu.method(1) == "faiss" and len(backend._cpu.shards) == 2  # B = 1 runs shards
    ex = torch.tensor([3, 75, -1, 139, 0])
    for i in range(b):
        for k, e in [(70, ex[i:i + 1]), (70, None), (69, ex[i:i + 1])]:
            got = backend.search(q[i:i + 1], k, e)
            assert_same_topk(got, kernels.ip_topk(q[i:i + 1], x, k, e), q[i:i + 1], x, exact_ids=integer)
            assert_excluded_and_full(got[1], e, k)


def _near_ties(n, d, b, gap, seed=0):
    """Rows whose scores against each query differ by ~gap (far below bfloat16's resolution, far above float32's):
    only the float32 re-rank can order them. Norms spread over 0.5-2 so the bound's max |x| is not |x|."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=1)
    v = v - (v @ u) * u
    q = u + 0.01 * torch.randn(b, d, generator=g)
    x = u + (torch.randperm(n, generator=g).float() * gap)[:, None] * v / (v @ v)
    return x * (0.5 + 1.5 * torch.rand(n, 1, generator=g)), q


@needs_faiss
@pytest.mark.parametrize("selection", ["team-slab-maxima", "team-heap", "shards-heap"])
def test_exact_bf16_filter_orders_what_bfloat16_cannot(selection, monkeypatch):
    x, q = _near_ties(3000, 32, 9, 1e-4)
    backend = build_backend("exact", x, threads=2, min_shard_rows=64, small_work=0,
                            bf16_team=selection.startswith("team"), **BF16)
    assert backend._cpu.method(9) == "bf16"
    redone = []
    if selection == "team-slab-maxima":
        backend._cpu.TEAM_SLAB_FROM = 1
        redone = _heap_redos(backend, monkeypatch)
    coarse = (q.bfloat16() @ x.bfloat16().t()).float().topk(K, dim=1).indices
    ref = kernels.ip_topk(q, x, K, _exclude(9, 3000))
    assert not torch.equal(coarse, ref[1])  # the data does defeat bfloat16 on its own
    got = backend.search(q, K, _exclude(9, 3000))
    assert_same_topk(got, ref, q, x, exact_ids=True)
    assert not redone  # the slab selection ordered them itself, no query handed to the heap


@needs_faiss
@pytest.mark.parametrize("spare", [0, 3])
def test_exact_bf16_filter_redoes_queries_whose_candidates_overflow(spare, monkeypatch):
    """With 0 (or 3) heap slots past k, queries may hold more candidates than kept: they are redone exactly."""
    from realm_hpc.retrieval import backends

    redone = []
    slab = backends._shard_topk
    monkeypatch.setattr(backends, "_shard_topk", lambda q, *a: redone.append(q.shape[0]) or slab(q, *a))
    x, q = _near_ties(3000, 32, 9, 1e-4)
    backend = build_backend("exact", x, threads=2, min_shard_rows=64, small_work=0, bf16_team=False, **BF16)
    backend._cpu.BF16_SPARE = spare
    ex = _exclude(9, 3000)
    assert_same_topk(backend.search(q, K, ex), kernels.ip_topk(q, x, K, ex), q, x, exact_ids=True)
    assert sum(redone) >= (2 * 9 if spare == 0 else 1)  # spare 0: every query in both shards


def _heap_redos(backend, monkeypatch) -> list:
    """Count the queries ``_team_bf16`` hands back to the heap path."""
    cpu, redone = backend._cpu, []
    heap = cpu._shard_bf16
    monkeypatch.setattr(cpu, "_shard_bf16", lambda q, *a: redone.append(q.shape[0]) or heap(q, *a))
    return redone


@needs_faiss
@pytest.mark.parametrize("integer", [True, False], ids=["integer-ties", "float"])
def test_exact_bf16_team_over_query_chunks(integer, monkeypatch):
    """The team filter in chunks of 5 queries (the last one short), k from 1 to 70, excluding for half the queries
    their best row: every chunk's own threshold and candidate table, and ties to the lower id across them."""
    n, d, b = 3001, 32, 23
    x, q = _data(n, d, integer), _data(b, d, integer, seed=2)
    backend = build_backend("exact", x, threads=2, **BF16)
    assert backend._cpu.method(b) == "bf16" and backend._cpu.bf16_team
    backend._cpu.TEAM_CHUNK = 5 * backend._cpu._xb.shape[0]
    backend._cpu.TEAM_SLAB_FROM = 1  # the slab selection at this B too (fewer queries default to the heap)
    redone = _heap_redos(backend, monkeypatch)
    best = kernels.ip_topk(q, x, 1)[1][:, 0]
    for k in (1, K, 70):
        ex = _exclude(b, n)
        ex[1::2] = best[1::2]  # REALM's case: the excluded row is the best match
        got = backend.search(q, k, ex)
        assert_same_topk(got, kernels.ip_topk(q, x, k, ex), q, x, exact_ids=integer)
        assert_excluded_and_full(got[1], ex, k)
    if not integer:
        assert not redone  # unit vectors in 32-d: a positive k-th score and ~k candidates, no query redone


@needs_faiss
def test_exact_bf16_team_redoes_what_its_int16_compare_cannot_bound(monkeypatch):
    """The team filter compares bfloat16 bits as int16, which orders only scores >= 0: queries whose threshold is
    not positive (every score negative), and queries with more than TEAM_CAP + 4k candidates (rows repeated), go to
    the heap path, and the answer is still the reference's (ties to the lower id among the copies)."""
    e0 = torch.eye(32)[0]
    x = torch.nn.functional.normalize(_data(3000, 32, False) + e0, dim=1)  # every row leans towards e0
    q = _data(12, 32, False, seed=2)
    x[1000:1400] = x[5]  # 400 copies of row 5, and query 3 aims at it: 401 rows tie at the top
    q[3] = x[5]
    q[6:9] = 0.1 * q[6:9] - e0  # aimed away from every row: the k-th best score is < 0
    backend = build_backend("exact", x, threads=2, **BF16)
    assert backend._cpu.method(12) == "bf16" and backend._cpu.bf16_team
    backend._cpu.TEAM_SLAB_FROM = 1
    redone = _heap_redos(backend, monkeypatch)
    ex = _exclude(12, 3000)
    ref = kernels.ip_topk(q, x, K, ex)
    assert (ref[0][6:9, K - 1] < 0).all() and torch.equal(ref[1][3], torch.tensor([5, *range(1000, 1007)]))
    got = backend.search(q, K, ex)
    assert_same_topk(got, ref, q, x, exact_ids=False)
    assert torch.equal(got[1][3], ref[1][3])  # equal scores: the lowest ids
    assert redone == [4]  # queries 3 and 6-8, in one redo


@pytest.mark.parametrize("d", [32, 128, 768])
def test_bfloat16_matmul_error_within_the_filters_bound(d):
    """The filter assumes torch's bfloat16 matmul sums in float32 and rounds once: |bf16 score - score| <=
    (3 * 2^-9 + (d + 4) * 2^-23) |q| |x| (its delta adds as much again for the float32 reference's own rounding).
    Checked on this machine's kernels, with norms spread over four orders of magnitude and B = 1, 16, 300 (oneDNN
    picks its kernel by shape)."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(4000, d, generator=g) * 10 ** (4 * torch.rand(4000, 1, generator=g) - 2)
    for b in (1, 16, 300):
        q = torch.randn(b, d, generator=g)
        approx = (q.bfloat16() @ x.bfloat16().t()).float()
        truth = q.double() @ x.double().t()
        bound = (3 * 2.0 ** -9 + (d + 4) * 2.0 ** -23) * q.double().norm(dim=1)[:, None] * x.double().norm(dim=1)
        assert ((approx.double() - truth).abs() <= bound).all()


@needs_faiss
def test_exact_bf16_filter_off_for_rows_or_queries_it_cannot_bound(monkeypatch):
    x = _data(3000, 32, False)
    on = build_backend("exact", x, threads=2, **BF16)
    assert on._cpu.method(5) == "bf16"
    bad = x.clone()
    bad[7, 3] = float("inf")
    assert build_backend("exact", bad, threads=2, **BF16)._cpu.method(5) != "bf16"
    q = _data(5, 32, False, seed=2)
    q[1, 0] = float("nan")

    def refuse(*args):
        raise AssertionError("a query without a bound reached the bfloat16 filter")

    monkeypatch.setattr(on._cpu, "_shard_bf16", refuse)
    monkeypatch.setattr(on._cpu, "_team_bf16", refuse)
    on.search(q, K)  # a NaN query: answered by a float32 path
    with pytest.raises(AssertionError, match="without a bound"):
        on.search(q.nan_to_num(), K)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_exact_low_precision_matches_ip_topk(dtype):
    x, q = _data(2000, 32, True), _data(20, 32, True, seed=2)
    backend = build_backend("exact", x, dtype=dtype, threads=2, min_shard_rows=64, chunk_elems=4096)
    ex = _exclude(20, 2000)
    assert_same_topk(backend.search(q, K, ex), kernels.ip_topk(q.to(backend.dtype), backend.x, K, ex), q, x, True)


def test_exact_leaves_caller_threads_alone():
    before = torch.get_num_threads()
    backend = build_backend("exact", _data(5000, 16, False), threads=2, min_shard_rows=64, small_work=0, team_bytes=0,
                            **F32)
    backend.search(_data(40, 16, False), K)
    assert torch.get_num_threads() == before
    faiss = pytest.importorskip("faiss")
    omp = faiss.omp_get_max_threads()
    backend.search(_data(1, 16, False), K)  # faiss path: the caller's thread runs one shard at one OpenMP thread
    assert faiss.omp_get_max_threads() == omp
    faiss.omp_set_num_threads(1)
    try:  # one team search at the backend's two threads puts the caller's one back
        team = build_backend("exact", _data(5000, 16, False), threads=2, small_work=0, **F32)
        assert team._cpu.method(3) == "faiss-team"
        team.search(_data(3, 16, False), K)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(omp)


def test_exact_numpy_input_and_argument_errors():
    x = _data(50, 8, False)
    backend = build_backend("exact", x.numpy(), threads=1)
    s, i = backend.search(x[:3].numpy(), 5, torch.tensor([0, 1, 2]).numpy())
    assert_excluded_and_full(i, torch.tensor([0, 1, 2]), 5)
    with pytest.raises(ValueError, match="k=51 > N=50"):
        backend.search(x[:1], 51)
    with pytest.raises(ValueError, match="fewer than k"):
        backend.search(x[:1], 50, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"queries must be \[B, 8\]"):
        backend.search(torch.zeros(2, 9), 3)


def test_build_backend_rejects_unknown_names():
    x = _data(10, 4, False)
    with pytest.raises(ValueError, match="unknown backend 'hnsw'"):
        build_backend("hnsw", x)
    with pytest.raises(ValueError, match="faiss-ivfpq: unknown parameter 'nlists'"):
        build_backend("faiss-ivfpq", x, nlists=4)


@needs_faiss
@pytest.mark.parametrize("b", [1, 50])
def test_faiss_flat_is_exact(b):
    x, q = _data(3000, 32, False), _data(b, 32, False, seed=2)
    backend = build_backend("faiss-flat", x)
    ref_s, ref_i = kernels.ip_topk(q, x, K, _exclude(b, 3000))
    s, i = backend.search(q, K, _exclude(b, 3000))
    assert recall_at_k(i, q, x, ref_s) == 1.0
    torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-5)
    assert_excluded_and_full(i, _exclude(b, 3000), K)


@needs_faiss
def test_faiss_flat_orders_ties_by_id():
    x = torch.zeros(100, 4)
    x[:, 0] = 1.0  # every row ties; which tied rows faiss keeps is its business, their order is ours
    s, i = build_backend("faiss-flat", x).search(torch.tensor([[1.0, 0, 0, 0]]), 5, torch.tensor([1]))
    assert (s == 1.0).all() and i[0].tolist() == sorted(i[0].tolist())
    assert_excluded_and_full(i, torch.tensor([1]), 5)


@needs_faiss
def test_faiss_ivfpq_reaches_configured_recall():
    n, d, b = 4000, 32, 64
    x = _clustered(n, d)
    q = torch.nn.functional.normalize(x[:b] + 0.05 * torch.randn(b, d, generator=torch.Generator().manual_seed(3)),
                                      dim=1)
    ex = torch.arange(b)  # REALM-style: each query's source document is excluded
    truth = kernels.ip_topk(q, x, K, ex)[0]
    backend = build_backend("faiss-ivfpq", x)
    assert backend.params["nlist"] <= n // 39 and d % backend.params["m"] == 0
    s, i = backend.search(q, K, ex)
    assert recall_at_k(i, q, x, truth) >= 0.9  # defaults
    assert_excluded_and_full(i, ex, K)
    assert (s[:, :-1] >= s[:, 1:]).all()
    backend.set_search_params(nprobe=backend.params["nlist"], k_factor=32)  # scan everything, re-rank 256
    s, i = backend.search(q, K, ex)
    assert recall_at_k(i, q, x, truth) >= 0.99
    assert_excluded_and_full(i, ex, K)


@needs_faiss
def test_faiss_ivfpq_always_returns_k():
    """One probed list of a many-list index holds fewer than k vectors: the flat re-rank index answers."""
    x = _clustered(800, 16)
    backend = build_backend("faiss-ivfpq", x, nlist=20, nprobe=1, k_factor=1)
    q, ex = x[:30], torch.arange(30)
    s, i = backend.search(q, 60, ex)
    assert_excluded_and_full(i, ex, 60)
    assert recall_at_k(i, q, x, kernels.ip_topk(q, x, 60, ex)[0]) > 0.5


def test_recall_is_tie_tolerant():
    x = torch.tensor([[1.0, 0], [1.0, 0], [0.5, 0], [0, 1.0]])  # rows 0 and 1 tie
    q = torch.tensor([[1.0, 0]])
    exact = torch.tensor([[1.0, 1.0]])  # top-2 scores
    assert recall_at_k(torch.tensor([[1, 0]]), q, x, exact) == 1.0
    assert recall_at_k(torch.tensor([[0, 2]]), q, x, exact) == 0.5  # 0.5 < the 2nd best 1.0
    assert recall_at_k(torch.tensor([[0, 0]]), q, x, exact) == 0.5  # a doc returned twice counts once


def test_torch_baseline_matches_exact_across_chunks_with_exclusion():
    """The bench's naive baseline (matmul + topk per chunk, merged) returns the exact answer, exclusion honoured,
    also when chunks are smaller than k and N is not a multiple of the chunk."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1001, 16, generator=g)
    q = torch.randn(7, 16, generator=g)
    exclude = (q @ x.T).argmax(dim=1)  # exclude each query's top hit
    s_ref, i_ref = build_backend("exact", x).search(q, 10, exclude)
    for chunk in (3, 128, 5000):
        s, i = build_backend("torch", x, chunk_rows=chunk).search(q, 10, exclude)
        assert torch.equal(i, i_ref), chunk
        torch.testing.assert_close(s, s_ref)
        assert not (i == exclude[:, None]).any()
