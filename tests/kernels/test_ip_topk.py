"""ip_topk: the torch reference against a full stable sort, and the Triton kernel (interpreter) against the
reference. Exactness is checked tie-aware: integer-valued data has exact scores in every summation order, so
ids must match exactly; random data is checked against float64 scores with a per-dtype tolerance."""

import importlib

import pytest
import torch

from kernels import ip_topk
from kernels.reference import ip_topk_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCORE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}  # relative to |q|*|x|


def _kernel():
    return importlib.import_module("kernels.ip_topk")


_TOPK_ROWS = _topk = None


def _topk_rows():
    """A one-program kernel applying ip_topk's _topk to a [16, C] int64 block (built on first use: it needs triton;
    the network is a module global because jit functions resolve names there, not in closures)."""
    global _TOPK_ROWS, _topk
    if _TOPK_ROWS is None:
        import triton
        import triton.language as tl

        _topk = _kernel()._topk

        @triton.jit
        def topk_rows(X, OUT, C: tl.constexpr, K: tl.constexpr, DESC: tl.constexpr):
            r = tl.arange(0, 16)[:, None]
            x = tl.load(X + r * C + tl.arange(0, C)[None, :])
            tl.store(OUT + r * K + tl.arange(0, K)[None, :], _topk(x, K, DESC))

        _TOPK_ROWS = topk_rows
    return _TOPK_ROWS


def brute_force(q, x, k, exclude=None):
    """Full float32 score matrix, excluded id pushed last, stable sort: (score desc, id asc) by construction."""
    s = q.float() @ x.float().T
    if exclude is not None:
        rows = (exclude >= 0).nonzero().squeeze(1)
        s[rows, exclude[rows]] = float("-inf")
    order = torch.sort(s, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def assert_valid_topk(scores, ids, q, x, k, exclude, tol):
    """Tie-aware exactness: every returned id is a true top-k member up to ``tol``, scores are its true score."""
    b = q.shape[0]
    assert scores.shape == ids.shape == (b, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.all(scores[:, :-1] >= scores[:, 1:]), "not sorted descending"
    true = q.double() @ x.double().T
    if exclude is not None:
        rows = (exclude >= 0).nonzero().squeeze(1)
        true[rows, exclude[rows]] = float("-inf")
        assert not torch.any(ids == exclude[:, None]), "excluded id returned"
    scale = q.double().norm(dim=1, keepdim=True) * x.double().norm(dim=1).max()
    kth = true.topk(k, dim=1).values[:, -1:]
    got = true.gather(1, ids)
    assert torch.all(got >= kth - tol * scale), "an id outside the top-k beyond tie tolerance"
    assert torch.all((scores.double() - got).abs() <= tol * scale), "score differs from the id's true score"
    for row in ids.tolist():
        assert len(set(row)) == k, "duplicate id"


def int_data(b, n, d, lo=-2, hi=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi, (b, d), generator=g).to(dtype)
    x = torch.randint(lo, hi, (n, d), generator=g).to(dtype)
    return q, x


# --------------------------------------------------------------------------------------------- reference (torch)

@pytest.mark.parametrize("chunk_rows", [None, 7, 64])
@pytest.mark.parametrize("seed", range(6))
def test_reference_equals_stable_sort_with_ties(seed, chunk_rows):
    g = torch.Generator().manual_seed(seed)
    b, n = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 400, (1,), generator=g))
    k = int(torch.randint(1, min(n - 1, 64) + 1, (1,), generator=g))
    q, x = int_data(b, n, 6, seed=seed)  # few distinct scores: ties everywhere, also at the k-th boundary
    exclude = torch.randint(-1, n, (b,), generator=g) if seed % 2 else None
    s, i = ip_topk_reference(q, x, k, exclude, chunk_rows=max(chunk_rows or 0, k + 1) if chunk_rows else None)
    bs, bi = brute_force(q, x, k, exclude)
    assert torch.equal(s, bs) and torch.equal(i, bi)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_random_data(dtype):
    torch.manual_seed(1)
    q, x = torch.randn(33, 96).to(dtype), torch.randn(1000, 96).to(dtype)
    exclude = torch.randint(-1, 1000, (33,))
    for chunk_rows in (None, 97):
        s, i = ip_topk_reference(q, x, 13, exclude, chunk_rows=chunk_rows)
        assert_valid_topk(s, i, q, x, 13, exclude, SCORE_TOL[dtype])


def test_reference_all_ties_prefer_lower_ids_and_exclusion_refills():
    q, x = torch.zeros(3, 4), torch.zeros(50, 4)
    s, i = ip_topk_reference(q, x, 5, torch.tensor([0, 2, -1]), chunk_rows=6)
    assert i.tolist() == [[1, 2, 3, 4, 5], [0, 1, 3, 4, 5], [0, 1, 2, 3, 4]]
    assert torch.all(s == 0)


def test_reference_excluding_the_top_hit_returns_the_next_k():
    torch.manual_seed(2)
    q, x = torch.randn(8, 16), torch.randn(300, 16)
    _, top = brute_force(q, x, 1)
    s, i = ip_topk_reference(q, x, 4, top[:, 0], chunk_rows=32)
    bs, bi = brute_force(q, x, 5)
    assert torch.equal(i, bi[:, 1:])


def test_argument_errors():
    q, x = torch.randn(2, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="k=11 > N=10"):
        ip_topk(q, x, 11)
    with pytest.raises(ValueError, match="fewer than k"):
        ip_topk(q, x, 10, torch.tensor([3, -1]))
    with pytest.raises(ValueError):
        ip_topk(q, x.double(), 3)
    with pytest.raises(ValueError):
        ip_topk(q, torch.randn(10, 7), 3)
    with pytest.raises(ValueError):
        ip_topk(q, x, 0)


@pytest.mark.usefixtures("triton_cpu")
def test_non_contiguous_inputs():
    torch.manual_seed(3)
    qbig, xbig = torch.randn(16, 6), torch.randn(48, 200)
    q, x = qbig.T[::2], xbig.T[:, ::3]  # [3, 16] strides (2, 6); [200, 16] strides (1, 600)
    assert not q.is_contiguous() and not x.is_contiguous()
    s, i = ip_topk(q, x, 7)
    assert_valid_topk(s, i, q, x, 7, None, 1e-5)
    ks, ki = _kernel().ip_topk_triton(q, x, 7, block_b=16, block_n=32)
    assert torch.equal(ki, i) and torch.allclose(ks, s, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------- Triton kernel (interpreter)

# Every test below runs the Triton kernel on CPU tensors through the interpreter.
# (B, N, D, k, blocks (BLOCK_B, BLOCK_N), splits): N < block, N not a block multiple, D not a power of two, B = 1
# and B > BLOCK_B, k = 1, non-power-of-two k, k = 64 with a tile narrower than KP (padded), several splits.
KERNEL_CASES = [
    (1, 5, 8, 1, (16, 16), None),
    (3, 100, 24, 5, (16, 16), None),
    (17, 70, 40, 10, (16, 32), 2),
    (2, 130, 16, 64, (16, 32), None),
    (4, 200, 20, 7, (16, 16), 5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,k,blocks,splits", KERNEL_CASES)
@pytest.mark.usefixtures("triton_cpu")
def test_kernel_matches_reference_int_data(b, n, d, k, blocks, splits, dtype):
    q, x = int_data(b, n, d, seed=b * n + k, dtype=dtype)  # exact in every precision: bitwise comparison
    exclude = torch.randint(-1, n, (b,), generator=torch.Generator().manual_seed(k)) if k < n else None
    s, i = _kernel().ip_topk_triton(q, x, k, exclude, block_b=blocks[0], block_n=blocks[1], splits=splits)
    rs, ri = ip_topk_reference(q, x, k, exclude)
    assert torch.equal(s, rs) and torch.equal(i, ri)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("triton_cpu")
def test_kernel_random_data_and_top_hit_exclusion(dtype):
    torch.manual_seed(4)
    q, x = torch.randn(5, 48).to(dtype), torch.randn(150, 48).to(dtype)
    _, top = brute_force(q, x, 1)
    s, i = _kernel().ip_topk_triton(q, x, 6, top[:, 0], block_b=16, block_n=32, splits=2)
    assert_valid_topk(s, i, q, x, 6, top[:, 0], SCORE_TOL[dtype])
    rs, ri = ip_topk_reference(q, x, 6, top[:, 0])
    assert torch.allclose(s, rs, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("triton_cpu")
def test_kernel_all_ties_and_wide_d_non_contiguous():
    q, x = torch.zeros(2, 200), torch.zeros(200, 40).T  # D = 200 (masked to 256), column-major index
    s, i = _kernel().ip_topk_triton(q, x, 3, torch.tensor([1, -1]), block_b=16, block_n=16)
    assert i.tolist() == [[0, 2, 3], [0, 1, 2]] and torch.all(s == 0)


@pytest.mark.usefixtures("triton_cpu")
def test_kernel_every_gpu_config(monkeypatch):
    """Each autotuning candidate (both batch buckets, 16- and 32-bit), run as the GPU would, on exact data."""
    m = _kernel()
    for (bucket, esize), cands in m.CONFIGS.items():
        dtype = torch.float32 if esize == 4 else torch.bfloat16
        b = 3 if bucket == 0 else 20
        q, x = int_data(b, 300, 40, seed=bucket, dtype=dtype)
        exclude = torch.arange(b) * 7
        for cfg in cands:
            s, i = m.ip_topk_triton(q, x, 9, exclude, **cfg)
            rs, ri = ip_topk_reference(q, x, 9, exclude)
            assert torch.equal(s, rs) and torch.equal(i, ri), cfg
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")  # and the entry point, with its own choice of config
    q, x = int_data(20, 150, 40, seed=9)
    assert torch.equal(ip_topk(q, x, 9, exclude)[1], ip_topk_reference(q, x, 9, exclude)[1])


@pytest.mark.parametrize("c,k,desc", [(8, 8, True), (64, 8, False), (32, 16, True), (16, 16, False)])
@pytest.mark.usefixtures("triton_cpu")
def test_topk_network(c, k, desc):
    """The bitonic top-k the merge is built from, alone: int64 keys with repeats, both directions."""
    g = torch.Generator().manual_seed(c + k)
    x = torch.randint(-(2**62), 2**62, (16, c), generator=g)
    x[:, ::3] = x[:, :1]  # repeated keys
    x[0] = -(2**63)  # an all-empty row (KEY_MIN)
    out = torch.empty(16, k, dtype=torch.int64)
    _topk_rows()[(1,)](x, out, C=c, K=k, DESC=desc)
    want = x.topk(k, dim=1).values
    assert torch.equal(out, want if desc else want.flip(1))


@pytest.mark.usefixtures("triton_cpu")
def test_threshold_filter_lets_few_tiles_through():
    """Past the first tiles a tile rarely beats every query's k-th best: the pack/merge branch is the exception."""
    torch.manual_seed(6)
    q, x = torch.randn(1, 32), torch.randn(2048, 32)
    merges = torch.zeros(1, dtype=torch.int32)
    s, i = _kernel()._ip_topk_forward(q, x, 8, merges=merges, splits=1, block_b=16, block_n=16)
    assert 1 <= int(merges) <= 128 // 3, int(merges)  # of 128 tiles: 33 here, ~8 ln(N / 8) insertions at most
    assert torch.equal(i, ip_topk_reference(q, x, 8)[1])


# ------------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.usefixtures("triton_gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,k", [(1, 100_003, 8), (64, 100_003, 64), (1000, 20_011, 13)])
def test_gpu_kernel_matches_reference(b, n, k, dtype, monkeypatch):
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")
    torch.manual_seed(5)
    q = torch.randn(b, 128, device="cuda").to(dtype)
    x = torch.randn(n, 128, device="cuda").to(dtype)
    exclude = torch.randint(-1, n, (b,), device="cuda")
    s, i = ip_topk(q, x, k, exclude)
    rs, ri = ip_topk_reference(q, x, k, exclude)
    assert torch.allclose(s, rs, rtol=1e-5, atol=1e-4)
    assert_valid_topk(s.cpu(), i.cpu(), q.cpu(), x.cpu(), k, exclude.cpu(), SCORE_TOL[dtype])
