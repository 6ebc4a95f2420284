"""The reader's MLM loss through the vocabulary projection, chunked over V: [n, T, V] logits never exist.

out[i] = sum_t mask[i, t] * log_softmax(hidden[i, t] @ W.T + b)[targets[i, t]]

Forward: for each chunk of C vocabulary rows, logits = hidden @ W[c].T + b[c] (in the inputs' dtype, then float32,
as the naive ``F.log_softmax(linear(h).float())`` does), folded into an online log-sum-exp per row; the target's
logit is picked from the chunk that holds it. Saved for backward: the inputs and one float32 lse per row.
Backward recomputes each chunk's logits (Liger-Kernel's fused linear cross-entropy trades the same FLOPs for the
same memory) and forms d logits = g * mask * (onehot(target) - softmax) for that chunk only:
d hidden += d @ W[c], d W[c] = d.T @ hidden, d b[c] = sum over rows of d.
Peak extra memory is O(M * C) for M = n * T rows instead of the naive path's several [M, V] float32 buffers;
the weight gradient [V, H] is the same in both.

There is no @triton.jit kernel here: each chunk is two GEMMs plus row-wise elementwise work, which cuBLAS and
torch already run near peak, so this file is launcher -> torch.autograd.Function -> public function, and dispatch
uses it in every mode (the naive reference lives in kernels/reference.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import check_target_logprob_args

# Default chunk: about 4 Mi float32 logits (16 MiB) per chunk, at least 128 vocabulary rows.
CHUNK_ELEMS = 1 << 22
MIN_CHUNK = 128


def default_chunk_size(rows: int, vocab: int) -> int:
    return max(1, min(vocab, max(MIN_CHUNK, CHUNK_ELEMS // max(rows, 1))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(h, w, b, c0: int, c1: int, acc: torch.dtype) -> torch.Tensor:
    return F.linear(h, w[c0:c1], None if b is None else b[c0:c1]).to(acc)


def _in_chunk(t: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of rows whose target lies in [c0, c1), their column in the chunk, clamped for the others)."""
    return (t >= c0) & (t < c1), (t - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)


# ------------------------------------------------------------------------------------------------------- launchers

def _target_logprob_forward(h, w, b, t, chunk: int):
    """Per-row log p(target) [M] and log-sum-exp [M], both in the accumulation dtype."""
    acc = _acc_dtype(h.dtype)
    m_rows, vocab = h.shape[0], w.shape[0]
    run_max = torch.full((m_rows,), float("-inf"), dtype=acc, device=h.device)
    run_sum = torch.zeros(m_rows, dtype=acc, device=h.device)
    picked = torch.zeros(m_rows, dtype=acc, device=h.device)
    for c0 in range(0, vocab, chunk):
        c1 = min(c0 + chunk, vocab)
        logits = _chunk_logits(h, w, b, c0, c1, acc)
        inside, col = _in_chunk(t, c0, c1)
        picked = torch.where(inside, logits.gather(1, col).squeeze(1), picked)
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        # exp(-inf - finite) = 0 on the first chunk; logits are overwritten in place to keep one [M, C] buffer
        run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        run_max = new_max
        del logits  # else the next chunk's buffer is allocated while this one is still alive
    lse = run_max + torch.log(run_sum)
    return picked - lse, lse


def _target_logprob_backward(h, w, b, t, lse, grad, chunk: int, needs: tuple[bool, bool, bool]):
    """Gradients of sum_rows grad[row] * logprob[row] w.r.t. (h, w, b); None where not needed."""
    acc = lse.dtype
    vocab = w.shape[0]
    dh = torch.zeros(h.shape, dtype=acc, device=h.device) if needs[0] else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if needs[1] else None  # contiguous rows for out=
    db = torch.empty(vocab, dtype=acc, device=h.device) if needs[2] else None
    g = grad.to(acc)
    for c0 in range(0, vocab, chunk):
        c1 = min(c0 + chunk, vocab)
        # d logits = g * (onehot - softmax), built in the logits' own buffer
        d = _chunk_logits(h, w, b, c0, c1, acc).sub_(lse[:, None]).exp_().mul_(-g[:, None])
        inside, col = _in_chunk(t, c0, c1)
        d.scatter_add_(1, col, torch.where(inside, g, torch.zeros_like(g)).unsqueeze(1))
        dc = d.to(h.dtype)  # GEMMs in the inputs' dtype, like the naive path's backward through .float()
        if dh is not None:
            dh += dc @ w[c0:c1]
        if dw is not None:
            torch.mm(dc.t(), h, out=dw[c0:c1])
        if db is not None:
            db[c0:c1] = d.sum(dim=0)
        del d, dc  # one chunk alive at a time
    return (None if dh is None else dh.to(h.dtype), dw,
            None if db is None else db.to(b.dtype))


class TargetLogprob(torch.autograd.Function):
    """Per-row log p(target): hidden [M, H], weight [V, H], bias [V] or None, targets [M] -> [M] float32/64."""

    @staticmethod
    def forward(ctx, h, w, b, t, chunk):
        out, lse = _target_logprob_forward(h, w, b, t, chunk)
        ctx.save_for_backward(h, w, b, t, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        h, w, b, t, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        dh, dw, db = _target_logprob_backward(h, w, b, t, lse, grad, ctx.chunk, needs)
        return dh, dw, db, None, None


# ----------------------------------------------------------------------------------------------------------- public

def target_logprob_chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, target_mask: torch.Tensor,
                           chunk_size: int | None = None) -> torch.Tensor:
    """sum_t mask * log_softmax(hidden @ weight.T + bias)[targets] per row: [n], float32 (float64 inputs: float64).

    Differentiable in hidden, weight and bias; targets under a zero mask may be anything (padding).
    chunk_size: vocabulary rows per chunk (default: about 4 Mi logits per chunk).
    """
    check_target_logprob_args(hidden, weight, bias, targets, target_mask, chunk_size)
    n, T, H = hidden.shape
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    h = hidden.reshape(n * T, H).to(dtype)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    mask = target_mask.to(_acc_dtype(dtype))
    # padding targets may be out of range (e.g. -100); they are never read once masked, but must index safely
    t = torch.where(target_mask.reshape(-1) != 0, targets.reshape(-1), 0).to(torch.int64)
    chunk = chunk_size or default_chunk_size(n * T, w.shape[0])
    per_token = TargetLogprob.apply(h.contiguous(), w, b, t, chunk)
    return (per_token.view(n, T) * mask).sum(dim=1)
