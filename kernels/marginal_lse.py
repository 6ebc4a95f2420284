"""REALM's marginal log-likelihood over retrieved documents, fused: log sum_z softmax(r)_z * exp(l_z).

out = lse(r + l) - lse(r) over the last dim (K docs). The forward streams each row once with two online
log-sum-exps and keeps three numbers per row (max r and both lse's relative to it) for the backward, which
needs one more pass:
d/dr = g * (post - prior), d/dl = g * post, post = softmax(r + l), prior = softmax(r).
-inf = an absent doc (in r) or zero reader probability (in l). Rows whose result is -inf (every doc absent, or
every present doc impossible) give -inf and zero gradients, matching reference.marginal_logsumexp_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _safe(m):
    """A finite stand-in for a running max that is still -inf, so x - m never evaluates -inf - -inf."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _marginal_lse_fwd_kernel(
    R, L, OUT, MAX_R, LSE_R, LSE_RL,
    M, K, stride_r, stride_l,
    F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Two online log-sum-exps, both in the frame of the running max of r: lse(r) - m and lse(r + l) - m.

    Working relative to m keeps the subtraction at the end between two numbers of size log K, not two of size
    |r| (r = -1e4 would otherwise cost ~1e-3 absolute in float32). A frame change (m grows by d) leaves the
    r + l sum untouched and just lowers its max by d.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cdt = tl.float64 if F64 else tl.float32
    r_base = R + rows.to(tl.int64)[:, None] * stride_r
    l_base = L + rows.to(tl.int64)[:, None] * stride_l
    m_r = tl.full((BLOCK_M,), NEG_INF, cdt)  # running max of r
    s_r = tl.zeros((BLOCK_M,), cdt)  # sum exp(r - m_r)
    m_v = tl.full((BLOCK_M,), NEG_INF, cdt)  # running max of v = (r - m_r) + l
    s_v = tl.zeros((BLOCK_M,), cdt)  # sum exp(v - m_v)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        mask = rmask[:, None] & (cols < K)
        r = tl.load(r_base + cols, mask=mask, other=NEG_INF).to(cdt)
        l = tl.load(l_base + cols, mask=mask, other=NEG_INF).to(cdt)
        m_new = tl.maximum(m_r, tl.max(r, axis=1))
        s_r = s_r * tl.exp(m_r - _safe(m_new)) + tl.sum(tl.exp(r - _safe(m_new)[:, None]), axis=1)
        # old v's shrink by the frame change (an all -inf prefix has none: m_v stays -inf)
        m_v = m_v - (_safe(m_new) - _safe(m_r))
        m_r = m_new
        v = (r - _safe(m_r)[:, None]) + l
        mv_new = tl.maximum(m_v, tl.max(v, axis=1))
        s_v = s_v * tl.exp(m_v - _safe(mv_new)) + tl.sum(tl.exp(v - _safe(mv_new)[:, None]), axis=1)
        m_v = mv_new
    # s == 0 exactly when a row's terms are all -inf: spelled out so no log(0) or -inf - -inf is evaluated
    dead = (s_r == 0.0) | (s_v == 0.0)
    lse_r = tl.log(tl.where(dead, 1.0, s_r))
    lse_rl = _safe(m_v) + tl.log(tl.where(dead, 1.0, s_v))
    tl.store(OUT + rows, tl.where(dead, NEG_INF, lse_rl - lse_r), mask=rmask)
    tl.store(MAX_R + rows, tl.where(dead, NEG_INF, m_r), mask=rmask)
    tl.store(LSE_R + rows, lse_r, mask=rmask)
    tl.store(LSE_RL + rows, lse_rl, mask=rmask)


@triton.jit
def _marginal_lse_bwd_kernel(
    R, L, G, MAX_R, LSE_R, LSE_RL, DR, DL,
    M, K, stride_r, stride_l,
    F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """post = exp((r - m) + l - lse_rl), prior = exp((r - m) - lse_r), both lse's relative to m (forward)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cdt = tl.float64 if F64 else tl.float32
    g = tl.load(G + rows, mask=rmask, other=0.0).to(cdt)
    m_r = tl.load(MAX_R + rows, mask=rmask, other=NEG_INF).to(cdt)
    lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0).to(cdt)[:, None]
    lse_rl = tl.load(LSE_RL + rows, mask=rmask, other=0.0).to(cdt)[:, None]
    dead = (m_r == NEG_INF)[:, None]  # the forward stores -inf here for every row whose result is -inf
    g = g[:, None]
    m_r = _safe(m_r)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        mask = rmask[:, None] & (cols < K)
        r = tl.load(R + rows64 * stride_r + cols, mask=mask, other=NEG_INF).to(cdt)
        l = tl.load(L + rows64 * stride_l + cols, mask=mask, other=NEG_INF).to(cdt)
        t = tl.where(dead, NEG_INF, r - m_r)  # dead rows: zero gradient, and no exp of a huge r
        post = tl.exp(t + l - lse_rl)
        prior = tl.exp(t - lse_r)
        tl.store(DR + rows64 * K + cols, g * (post - prior), mask=mask)
        tl.store(DL + rows64 * K + cols, g * post, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# launchers

def blocks_for(k: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K), one config for every K: at REALM's sizes (B x K of a few thousand) this op is bound by
    launch latency, not lanes, so a second width would only add compiled variants. K > 64 loops."""
    return 16, 64


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _marginal_lse_forward(r: torch.Tensor, l: torch.Tensor):
    m, k = r.shape
    cdt = torch.float64 if r.dtype == torch.float64 else torch.float32
    out, max_r, lse_r, lse_rl = torch.empty((4, m), dtype=cdt, device=r.device)
    block_m, block_k = blocks_for(k)
    _marginal_lse_fwd_kernel[(triton.cdiv(m, block_m),)](
        r, l, out, max_r, lse_r, lse_rl, m, k, r.stride(0), l.stride(0),
        F64=cdt == torch.float64, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return out, (max_r, lse_r, lse_rl)


def _marginal_lse_backward(r, l, g, stats):
    max_r, lse_r, lse_rl = stats
    m, k = r.shape
    dr = torch.empty((m, k), dtype=r.dtype, device=r.device)
    dl = torch.empty((m, k), dtype=l.dtype, device=l.device)
    block_m, block_k = blocks_for(k)
    _marginal_lse_bwd_kernel[(triton.cdiv(m, block_m),)](
        r, l, g.contiguous(), max_r, lse_r, lse_rl, dr, dl, m, k, r.stride(0), l.stride(0),
        F64=lse_r.dtype == torch.float64, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return dr, dl


def launch_configs():
    """Every (kernel, signature, constexprs, options) the launcher above can produce, for the AOT check."""
    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    for dtype, name in dtypes.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for block_m, block_k in sorted({blocks_for(k) for k in range(1, 1025)}):
            const = {"F64": dtype == torch.float64, "BLOCK_M": block_m, "BLOCK_K": block_k}
            common = {"M": "i32", "K": "i32", "stride_r": "i32", "stride_l": "i32"}
            yield (_marginal_lse_fwd_kernel,
                   {"R": f"*{name}", "L": f"*{name}", "OUT": f"*{acc}", "MAX_R": f"*{acc}", "LSE_R": f"*{acc}",
                    "LSE_RL": f"*{acc}", **common}, const, {"num_warps": 4})
            yield (_marginal_lse_bwd_kernel,
                   {"R": f"*{name}", "L": f"*{name}", "G": f"*{acc}", "MAX_R": f"*{acc}", "LSE_R": f"*{acc}",
                    "LSE_RL": f"*{acc}", "DR": f"*{name}", "DL": f"*{name}", **common}, const, {"num_warps": 4})


class MarginalLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, l):
        shape = r.shape
        r2, l2 = _rows(r), _rows(l)
        out, stats = _marginal_lse_forward(r2, l2)
        ctx.save_for_backward(r2, l2, *stats)
        ctx.shape = shape
        return out.view(shape[:-1])

    @staticmethod
    def backward(ctx, g):
        r2, l2, *stats = ctx.saved_tensors
        dr, dl = _marginal_lse_backward(r2, l2, g.reshape(-1), stats)
        return dr.view(ctx.shape), dl.view(ctx.shape)


def marginal_logsumexp_triton(retrieval_scores: torch.Tensor, reader_logprob: torch.Tensor) -> torch.Tensor:
    """Triton forward and backward; same contract as reference.marginal_logsumexp_reference."""
    r, l = retrieval_scores, reader_logprob
    if r.shape != l.shape:
        raise ValueError(f"marginal_logsumexp: shapes differ: {tuple(r.shape)} vs {tuple(l.shape)}")
    if r.dim() == 0:
        raise ValueError("marginal_logsumexp: needs a last dimension of documents")
    if r.dtype != l.dtype:  # one dtype pair per compiled variant; autograd casts the gradients back
        common = torch.promote_types(r.dtype, l.dtype)
        r, l = r.to(common), l.to(common)
    if r.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"marginal_logsumexp: unsupported dtype {r.dtype}")
    if r.numel() == 0:
        from kernels.reference import marginal_logsumexp_reference

        return marginal_logsumexp_reference(r, l)
    return MarginalLogSumExp.apply(r, l)
