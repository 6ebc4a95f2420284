"""target_logprob: the vocabulary-chunked MLM head loss against the naive full-logits reference (values and the
gradients of hidden, weight and bias), its memory contract (nothing of size n*T*V saved for backward), and the
reader's plain-MLM loss routed through it."""

import importlib

import pytest
import torch

import kernels
from kernels.reference import target_logprob_reference as ref
from kernels.target_logprob import TargetLogprob, target_logprob_chunked


def inputs(n, T, H, V, dtype=torch.float64, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (n, T), generator=g)
    m = torch.ones(n, T)
    if pad and T > 1:  # padded tail positions: mask 0 and junk target ids (out of range, as -100 padding)
        m[0, T // 2:] = 0
        t[0, T - 1] = -100
        t[-1, 0] = V + 7
        m[-1, 0] = 0
    return h.to(dtype), w.to(dtype), b.to(dtype), t, m


def value_and_grads(fn, h, w, b, t, m, g=None, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = fn(h, w, b, t, m, **kw)
    out.backward(torch.ones_like(out) if g is None else g.to(out.dtype))
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("n,T,H,V,chunk", [
    (3, 4, 8, 37, 5),     # V not a multiple of the chunk
    (2, 5, 6, 16, 1),     # one vocabulary row per chunk
    (2, 3, 4, 10, 10),    # chunk == V
    (2, 3, 4, 10, 64),    # chunk > V
    (1, 1, 3, 1, None),   # a one-word vocabulary: log p = 0
    (4, 6, 8, 300, None),  # default chunk
    (3, 4, 8, 300, 128),
])
def test_matches_reference_float64(n, T, H, V, chunk):
    h, w, b, t, m = inputs(n, T, H, V, seed=V + (chunk or 0))
    g = torch.randn(n, dtype=torch.float64)
    want = value_and_grads(ref, h, w, b, t, m, g)
    got = value_and_grads(target_logprob_chunked, h, w, b, t, m, g, chunk_size=chunk)
    for a, e in zip(got, want):
        assert a.dtype == e.dtype == torch.float64 and a.shape == e.shape
        assert torch.allclose(a, e, rtol=1e-12, atol=1e-12)
    if V == 1:
        assert torch.all(got[0] == 0)


def test_gradcheck_and_formula():
    h, w, b, t, m = inputs(2, 3, 4, 11, seed=1)
    fn = lambda h, w, b: target_logprob_chunked(h, w, b, t, m, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    # d out / d b = sum over real positions of (onehot(target) - softmax)
    out, _, _, db = value_and_grads(target_logprob_chunked, h, w, b, t, m, chunk_size=4)
    p = torch.softmax(h.detach() @ w.detach().T + b.detach(), -1)
    onehot = torch.nn.functional.one_hot(torch.where(m != 0, t, 0), 11).double()
    assert torch.allclose(db, ((onehot - p) * m.double()[..., None]).sum((0, 1)), atol=1e-12)


def test_no_bias_and_masked_rows():
    h, w, _, t, m = inputs(3, 4, 5, 23, seed=2)
    got = value_and_grads(target_logprob_chunked, h, w, None, t, m, chunk_size=6)
    want = value_and_grads(ref, h, w, None, t, m)
    for a, e in zip(got[:3], want[:3]):
        assert torch.allclose(a, e, rtol=1e-12, atol=1e-12)
    assert got[3] is None
    assert torch.all(got[1][m == 0] == 0)  # a padded position has no gradient
    empty = torch.zeros(3, 4)
    assert torch.all(target_logprob_chunked(h, w, None, t, empty) == 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs(dtype, tol):
    h, w, b, t, m = inputs(4, 5, 16, 97, dtype=dtype, seed=3)
    g = torch.randn(4)
    got = value_and_grads(target_logprob_chunked, h, w, b, t, m, g, chunk_size=20)
    want = value_and_grads(ref, h, w, b, t, m, g)
    assert got[0].dtype == want[0].dtype == torch.float32  # float32 loss for any low-precision input
    assert all(x.dtype == dtype for x in got[1:])
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-4)  # same rounded logits, float32 softmax
    for a, e in zip(got[1:], want[1:]):
        assert torch.allclose(a.float(), e.float(), rtol=tol, atol=tol)
    exact = ref(h.double(), w.double(), b.double(), t, m)  # and both near the float64 truth
    assert torch.allclose(got[0].double(), exact, rtol=tol, atol=tol * 10)


def test_nothing_of_size_rows_times_vocab_is_saved():
    """The backward keeps the inputs and one lse per row: no [n*T, C] chunk, let alone [n*T, V]."""
    n, T, H, V = 4, 8, 4, 200  # n*T*V = 6400 > V*H = 800, the weight itself
    h, w, b, t, m = inputs(n, T, H, V, seed=4)
    h.requires_grad_()
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        target_logprob_chunked(h, w, b, t, m, chunk_size=50)
        biggest_chunked = max(sizes)
        sizes.clear()
        ref(h, w, b, t, m)
    assert biggest_chunked == V * H < n * T * V
    assert max(sizes) >= n * T * V  # the naive path saves the full log-softmax


def test_bad_inputs_are_one_line_errors():
    h, w, b, t, m = inputs(2, 3, 4, 10, seed=5, pad=False)
    bad = t.clone()
    bad[1, 1] = 10
    for fn in (target_logprob_chunked, ref):
        with pytest.raises(ValueError, match=r"target id under the mask is outside \[0, V=10\)"):
            fn(h, w, b, bad, m)
        with pytest.raises(ValueError, match="hidden has H=4 but weight has H=5"):
            fn(h, torch.randn(10, 5, dtype=h.dtype), b, t, m)
        with pytest.raises(ValueError, match="targets and target_mask must be"):
            fn(h, w, b, t[:, :2], m)
        with pytest.raises(ValueError, match="integer ids"):
            fn(h, w, b, t.float(), m)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        target_logprob_chunked(h, w, b, t, m, chunk_size=0)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_every_mode_runs_the_chunked_path(backend, monkeypatch):
    monkeypatch.setenv("REALM_HPC_KERNELS", backend)
    calls = []
    real = TargetLogprob.apply
    monkeypatch.setattr(TargetLogprob, "apply", lambda *a: calls.append(1) or real(*a))
    h, w, b, t, m = inputs(2, 3, 4, 10, dtype=torch.float32, seed=6)
    assert torch.allclose(kernels.target_logprob(h, w, b, t, m, chunk_size=3), ref(h, w, b, t, m), atol=1e-5)
    assert calls == [1]
    monkeypatch.setenv("REALM_HPC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="REALM_HPC_KERNELS"):
        kernels.target_logprob(h, w, b, t, m)


def test_public_name_survives_importing_the_module():
    importlib.import_module("kernels.target_logprob")
    assert callable(kernels.target_logprob) and not isinstance(kernels.target_logprob, type(importlib))


def test_reader_target_logprob_equals_the_naive_head():
    from realm_hpc.config import ModelConfig
    from realm_hpc.models.reader import Reader

    torch.manual_seed(0)
    reader = Reader(ModelConfig(hidden=32, layers=1, heads=2, intermediate=64, reader_len=24), vocab_size=203)
    reader = reader.eval()  # no dropout
    n, L, T = 3, 20, 4
    ids = torch.randint(0, 203, (n, L))
    args = dict(input_ids=ids, attention_mask=torch.ones(n, L, dtype=torch.long),
                token_type_ids=torch.zeros(n, L, dtype=torch.long), positions=torch.randint(1, L, (n, T)))
    targets = torch.randint(0, 203, (n, T))
    mask = torch.ones(n, T)
    mask[1, 2:] = 0
    doc_mask = torch.zeros(n, L, dtype=torch.bool)

    got = reader.target_logprob(**args, targets=targets, target_mask=mask, doc_mask=doc_mask)
    got.sum().backward()
    got_grads = {k: p.grad.clone() for k, p in reader.named_parameters() if p.grad is not None}
    reader.zero_grad(set_to_none=True)
    logp = reader.token_logprobs(**args, doc_mask=doc_mask)  # the naive path: full [n, T, V]
    want = (logp.gather(2, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    want.sum().backward()
    assert got.dtype == want.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    want_grads = {k: p.grad for k, p in reader.named_parameters() if p.grad is not None}
    assert got_grads.keys() == want_grads.keys() and any("decoder" in k or "bias" in k for k in got_grads)
    for k in want_grads:
        assert torch.allclose(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6), k
