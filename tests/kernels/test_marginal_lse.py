"""marginal_logsumexp: reference checked by gradcheck and by enumerating documents; the Triton forward and
backward (interpreter) checked against the reference's autograd, including -inf and extreme inputs."""

import importlib
import decimal
import os

import pytest
import torch

from kernels import marginal_logsumexp
from kernels.reference import marginal_logsumexp_reference as ref

NEG_INF = float("-inf")


def triton_mlse(r, l):
    pytest.importorskip("triton")
    if r.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1")
    return importlib.import_module("kernels.marginal_lse").marginal_logsumexp_triton(r, l)


def value_and_grads(fn, r, l, g=None):
    r = r.detach().clone().requires_grad_()
    l = l.detach().clone().requires_grad_()
    out = fn(r, l)
    g = torch.ones_like(out) if g is None else g
    out.backward(g)
    return out.detach(), r.grad, l.grad


def brute_force(r, l):
    """log sum_z p(z|x) p(y|z,x), enumerating documents with 60-digit decimals (no under/overflow at +-1e4)."""
    ctx = decimal.Context(prec=60)
    exp = lambda v: decimal.Decimal(0) if v == NEG_INF else ctx.exp(decimal.Decimal(v))  # noqa: E731
    out = []
    for rr, ll in zip(r.double().tolist(), l.double().tolist()):
        z = sum(exp(v) for v in rr)
        if z == 0:
            out.append(NEG_INF)
            continue
        p = sum(exp(v) / z * exp(w) for v, w in zip(rr, ll))
        out.append(float(ctx.ln(p)) if p > 0 else NEG_INF)
    return torch.tensor(out, dtype=torch.float64)


def inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    l = -torch.rand(shape, generator=g, dtype=torch.float64) * 5  # log-probabilities
    return r.to(dtype), l.to(dtype)


def test_reference_gradcheck():
    r, l = inputs((4, 7))
    l[1, 2] = NEG_INF  # a doc the reader finds impossible: d/dl there is g * post = 0
    assert torch.autograd.gradcheck(ref, (r.requires_grad_(), l.requires_grad_()))


def test_reference_formula_gradients():
    r, l = inputs((3, 9), seed=1)
    out, dr, dl = value_and_grads(ref, r, l, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:, None]
    post, prior = torch.softmax(r + l, -1), torch.softmax(r, -1)
    assert torch.allclose(dr, g * (post - prior)) and torch.allclose(dl, g * post)


@pytest.mark.parametrize("impl", [ref, triton_mlse], ids=["reference", "triton"])
def test_brute_force_enumeration(impl):
    r, l = inputs((6, 11), seed=2)
    r[0, :3] = NEG_INF
    l[1, 5:] = NEG_INF
    assert torch.allclose(impl(r, l), brute_force(r, l), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (3, 9), (5, 64), (4, 65), (2, 300), (2, 3, 9)])
def test_triton_matches_reference_float64(shape):
    r, l = inputs(shape, seed=len(shape) * 100 + shape[-1])
    g = torch.randn(shape[:-1], dtype=torch.float64)
    want = value_and_grads(ref, r, l, g)
    got = value_and_grads(triton_mlse, r, l, g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_streaming_max_moves_across_chunks(dtype):
    """K spans several BLOCK_K chunks and the max of r keeps growing: every chunk changes the frame."""
    r = torch.linspace(-1e4, 1e4, 300, dtype=torch.float64).repeat(3, 1)
    r[1] = r[1].flip(0)
    r[2, :200] = NEG_INF  # absent docs first: the frame starts late
    l = -torch.linspace(0.0, 30.0, 300, dtype=torch.float64).repeat(3, 1)
    r, l = r.to(dtype), l.to(dtype)
    want = value_and_grads(ref, r, l)
    got = value_and_grads(triton_mlse, r, l)
    assert torch.allclose(got[0].double(), brute_force(r, l), rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_triton_matches_reference_low_precision(dtype, tol):
    r, l = inputs((7, 40), dtype=dtype, seed=3)
    g = torch.randn(7)
    want = value_and_grads(ref, r, l, g)
    got = value_and_grads(triton_mlse, r, l, g)
    assert got[0].dtype == want[0].dtype == torch.float32  # float32 loss for any low-precision input
    assert got[1].dtype == got[2].dtype == dtype
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", [ref, triton_mlse], ids=["reference", "triton"])
def test_absent_docs_extremes_and_dead_rows(impl):
    r = torch.tensor([
        [1e4, -1e4, 0.0, NEG_INF],     # extreme but finite scores, one absent doc
        [NEG_INF, NEG_INF, NEG_INF, NEG_INF],  # every doc absent -> -inf, zero gradients
        [2.0, 1.0, NEG_INF, 0.0],      # the reader gives every present doc zero probability -> -inf
        [-1e4, -1e4, -1e4, -1e4],      # huge negative but equal: a uniform prior
    ], dtype=torch.float64)
    l = torch.tensor([
        [-1e4, 0.0, -1.0, -2.0],
        [-1.0, -2.0, -3.0, -4.0],
        [NEG_INF, NEG_INF, -1.0, NEG_INF],
        [-1.0, -2.0, NEG_INF, -1e4],
    ], dtype=torch.float64)
    out, dr, dl = value_and_grads(impl, r, l)
    want_out = brute_force(r, l)
    assert torch.allclose(out, want_out, rtol=1e-12, atol=1e-9)
    assert out[1] == NEG_INF and out[2] == NEG_INF
    assert torch.isfinite(dr).all() and torch.isfinite(dl).all()
    assert torch.all(dr[1:3] == 0) and torch.all(dl[1:3] == 0)
    post = torch.softmax(r + l, -1)
    prior = torch.softmax(r, -1)
    for row in (0, 3):
        assert torch.allclose(dr[row], post[row] - prior[row], atol=1e-12)
        assert torch.allclose(dl[row], post[row], atol=1e-12)
    # the same in float32: no overflow at +-1e4 and no NaN
    out32, dr32, dl32 = value_and_grads(impl, r.float(), l.float())
    assert torch.allclose(out32.double(), want_out, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(dr32).all() and torch.isfinite(dl32).all()


@pytest.mark.parametrize("impl", [ref, triton_mlse], ids=["reference", "triton"])
def test_empty_inputs(impl):
    assert impl(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)
    r = torch.zeros(3, 0, requires_grad=True)
    out = impl(r, torch.zeros(3, 0))
    assert out.shape == (3,) and torch.all(out == NEG_INF)
    out.sum().backward()
    assert r.grad.shape == (3, 0)


@pytest.mark.usefixtures("triton_cpu")
def test_public_entry_point_mixed_dtypes_and_autograd(monkeypatch):
    r, l = inputs((5, 9), dtype=torch.float32, seed=4)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("REALM_HPC_KERNELS", backend)
        out, dr, dl = value_and_grads(marginal_logsumexp, r, l.bfloat16())
        assert out.dtype == torch.float32 and dr.dtype == torch.float32 and dl.dtype == torch.bfloat16
        assert torch.allclose(out, ref(r, l.bfloat16()), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(dtype, monkeypatch):
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")
    r, l = inputs((512, 257), dtype=dtype, seed=5)
    r, l = r.cuda(), l.cuda()
    r[0] = NEG_INF
    got = value_and_grads(marginal_logsumexp, r, l)
    want = value_and_grads(ref, r, l)
    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-4)
