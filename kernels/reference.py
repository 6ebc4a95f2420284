"""Plain-torch references for the kernels; also the CPU path training runs on.

Both functions are exact definitions the Triton kernels are tested against, and fast enough on CPU to be the
real implementation there: ``ip_topk_reference`` streams the index in chunks (never a B x N score matrix for
large N) and ``marginal_logsumexp_reference`` is a few fused-by-torch ops with autograd.
``target_logprob_reference`` is the naive MLM head loss (full [n, T, V] logits): the definition the chunked
kernels/target_logprob.py is tested against, not a path training takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 64
MAX_D = 256  # the Triton ip_topk holds [BLOCK_N, D] tiles in its pipeline; wider embeddings run the reference

# Packed top-k keys: an order-preserving int32 image of the float32 score in the high half, and
# (0xFFFFFFFF - id) in the low half, so that a plain integer max picks the higher score and, on equal scores,
# the lower id. The same packing is used by the Triton kernel; sharing it keeps tie semantics identical.
_LOW_MASK = 0xFFFFFFFF
KEY_MIN = -(2**63)  # below every real key: marks excluded / padding slots

# Upper bounds for one chunk of the streaming search: ~64 MiB of float32 scores and ~64 MiB of float32 index rows.
_CHUNK_SCORE_ELEMS = 1 << 24
_CHUNK_INDEX_ELEMS = 1 << 24
_MAX_CHUNK_ROWS = 65536
_QUERY_BLOCK = 4096


def pack_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 scores + int64 ids -> int64 keys whose integer order is (score desc, id asc)."""
    s = scores.float()
    s = torch.where(s == 0, torch.zeros((), dtype=s.dtype, device=s.device), s)  # -0.0 ties with +0.0
    bits = s.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (_LOW_MASK - ids.to(torch.int64))


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW_MASK - (keys & _LOW_MASK)


def check_ip_topk_args(q: torch.Tensor, index: torch.Tensor, k: int, exclude: torch.Tensor | None) -> None:
    """Shared argument checks so every backend fails the same way on bad input."""
    if q.dim() != 2 or index.dim() != 2:
        raise ValueError(f"ip_topk: q must be [B, D] and index [N, D], got {tuple(q.shape)} and {tuple(index.shape)}")
    if q.shape[1] != index.shape[1]:
        raise ValueError(f"ip_topk: dim mismatch, q has D={q.shape[1]} but index has D={index.shape[1]}")
    if q.dtype != index.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"ip_topk: q and index must share one dtype of {SUPPORTED_DTYPES}, "
                         f"got {q.dtype}, {index.dtype}")
    if q.device != index.device:
        raise ValueError(f"ip_topk: q on {q.device} but index on {index.device}")
    if q.shape[0] < 1:
        raise ValueError("ip_topk: need at least one query")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"ip_topk: k must be a positive int, got {k!r}")
    n = index.shape[0]
    if k > n:
        raise ValueError(f"ip_topk: k={k} > N={n} index rows")
    if n >= 2**32 - 1:
        raise ValueError("ip_topk: ids are packed in 32 bits; shard indexes with >= 2**32 - 1 rows")
    if exclude is not None:
        if exclude.shape != (q.shape[0],):
            raise ValueError(f"ip_topk: exclude must be [B]={q.shape[0]}, got {tuple(exclude.shape)}")
        if exclude.device != q.device:
            raise ValueError(f"ip_topk: exclude on {exclude.device} but q on {q.device}")
        # Only when k == N can an exclusion leave fewer than k results; checking just then avoids a sync.
        if k == n and bool(((exclude >= 0) & (exclude < n)).any()):
            raise ValueError(f"ip_topk: k={k} == N and an id is excluded: fewer than k results exist")


def _chunk_topk(scores: torch.Tensor, k: int, start: int, exclude: torch.Tensor | None) -> torch.Tensor:
    """Exact top-k keys of one [B, C] score chunk (ids offset by ``start``).

    torch.topk returns the right values but an arbitrary member of a tie. Taking k+1 shows whether the k-th
    value ties with one left out; only such rows pay for the full packed-key selection.
    """
    b, c = scores.shape
    take = min(k + 1, c)
    vals, idx = scores.topk(take, dim=1, sorted=True)
    if take > k:
        tied = vals[:, k] == vals[:, k - 1]
        vals, idx = vals[:, :k], idx[:, :k]
        keys = pack_keys(vals, idx + start)
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            local = torch.arange(c, device=scores.device, dtype=torch.int64).expand(rows.numel(), c)
            full = pack_keys(scores[rows], local + start)
            if exclude is not None:  # an excluded -inf must not beat a real -inf of higher id
                full = _mask_excluded(full, exclude[rows])
            keys[rows] = full.topk(k, dim=1, sorted=False).values
        return keys
    return pack_keys(vals, idx + start)


def _mask_excluded(keys: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    if exclude is None:
        return keys
    ids = _LOW_MASK - (keys & _LOW_MASK)
    return keys.masked_fill(ids == exclude[:, None], KEY_MIN)


@torch.no_grad()
def ip_topk_reference(
    q: torch.Tensor,
    index: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-inner-product top-k, streamed over the index.

    Scores are float32 (inputs upcast per chunk) and detached: retrieval picks documents, the gradient reaches
    the retriever through re-scored documents, not through this search. Ties go to the lower id; ``exclude``
    (int64 [B], -1 = none) removes one id per query before selection, so k results always come back.
    """
    check_ip_topk_args(q, index, k, exclude)
    b, d = q.shape
    n = index.shape[0]
    if exclude is not None:
        exclude = exclude.to(torch.int64)
    qf = q.float()
    if chunk_rows is None:
        chunk_rows = max(k + 1, min(_MAX_CHUNK_ROWS, _CHUNK_SCORE_ELEMS // min(b, _QUERY_BLOCK),
                                    _CHUNK_INDEX_ELEMS // d))
    out_keys = []
    for q0 in range(0, b, _QUERY_BLOCK):  # bounds the score buffer for very large B
        qb = qf[q0:q0 + _QUERY_BLOCK]
        ex = None if exclude is None else exclude[q0:q0 + _QUERY_BLOCK]
        best = None
        buf = None
        for start in range(0, n, chunk_rows):
            x = index[start:start + chunk_rows]
            c = x.shape[0]
            if buf is None or buf.shape[1] != c:
                buf = torch.empty(qb.shape[0], c, dtype=torch.float32, device=q.device)
            scores = torch.mm(qb, x.float().t(), out=buf)
            if ex is not None:
                # scatter -inf at the excluded column (a clamped dummy column where the id is elsewhere)
                inside = (ex >= start) & (ex < start + c)
                col = (ex - start).clamp(0, c - 1)[:, None]
                scores.scatter_(1, col, torch.where(inside[:, None], float("-inf"), scores.gather(1, col)))
            keys = _mask_excluded(_chunk_topk(scores, min(k, c), start, ex), ex)
            if best is not None:
                keys = torch.cat([best, keys], dim=1)
            best = keys.topk(min(k, keys.shape[1]), dim=1, sorted=False).values
        out_keys.append(best.sort(dim=1, descending=True).values)
    scores, ids = unpack_keys(torch.cat(out_keys) if len(out_keys) > 1 else out_keys[0])
    return scores, ids


def marginal_logsumexp_reference(retrieval_scores: torch.Tensor, reader_logprob: torch.Tensor) -> torch.Tensor:
    """log sum_z softmax(r)_z * exp(l_z) over the last dim, with autograd from plain torch ops.

    Computed as lse(r + l) - lse(r) in float32 (float64 stays float64). -inf marks an absent document (in r) or
    zero reader probability (in l). A row whose result is -inf (all docs absent, or every present doc given
    zero probability) returns -inf with zero gradients rather than NaN: such a row carries no signal.
    """
    r, l = retrieval_scores, reader_logprob
    if r.shape != l.shape:
        raise ValueError(f"marginal_logsumexp: shapes differ: {tuple(r.shape)} vs {tuple(l.shape)}")
    dtype = torch.promote_types(torch.promote_types(r.dtype, l.dtype), torch.float32)
    r, l = r.to(dtype), l.to(dtype)
    if r.shape[-1] == 0:  # no documents at all: every row is dead (kept in the graph for a zero gradient)
        return r.sum(dim=-1) * 0 + float("-inf")
    zero = torch.zeros((), dtype=dtype, device=r.device)
    # Shift by max r (a constant for the gradient): the final subtraction is then between two numbers of
    # size ~log K instead of ~|r|, which at r = -1e4 in float32 is the difference between 1e-7 and 1e-3 error.
    m = r.detach().amax(dim=-1, keepdim=True)
    absent = torch.isneginf(m)
    t = r - torch.where(absent, zero, m)
    v = t + l
    dead = torch.isneginf(v.detach()).all(dim=-1)  # covers all-absent rows too: r = -inf makes v = -inf
    # Swap dead rows for zeros before logsumexp so its backward (exp(x - lse)) never sees -inf - -inf.
    t = torch.where(dead[..., None], zero, t)
    v = torch.where(dead[..., None], zero, v)
    out = torch.logsumexp(v, dim=-1) - torch.logsumexp(t, dim=-1)
    return torch.where(dead, torch.full((), float("-inf"), dtype=dtype, device=r.device), out)


def check_target_logprob_args(hidden, weight, bias, targets, target_mask, chunk_size) -> None:
    """Shared argument checks so the chunked and naive paths fail the same way on bad input."""
    if hidden.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"target_logprob: hidden must be [n, T, H] and weight [V, H], "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"target_logprob: hidden has H={hidden.shape[-1]} but weight has H={weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"target_logprob: bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    if targets.shape != hidden.shape[:2] or target_mask.shape != hidden.shape[:2]:
        raise ValueError(f"target_logprob: targets and target_mask must be [n, T]={tuple(hidden.shape[:2])}, "
                         f"got {tuple(targets.shape)} and {tuple(target_mask.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"target_logprob: targets must be integer ids, got {targets.dtype}")
    if not (hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"target_logprob: hidden and weight must be floating point, "
                         f"got {hidden.dtype}, {weight.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"target_logprob: chunk_size must be a positive int, got {chunk_size!r}")
    if weight.shape[0] < 1:
        raise ValueError("target_logprob: empty vocabulary")
    real = target_mask != 0
    if bool((real & ((targets < 0) | (targets >= weight.shape[0]))).any()):
        raise ValueError(f"target_logprob: a target id under the mask is outside [0, V={weight.shape[0]})")


def target_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask * log_softmax(hidden @ weight.T + bias)[targets] per row: [n], the naive way (full [n, T, V]
    logits, as BertForMaskedLM's head + log_softmax + gather). float32 result (float64 inputs: float64)."""
    check_target_logprob_args(hidden, weight, bias, targets, target_mask, None)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    t = torch.where(target_mask != 0, targets, 0).to(torch.int64)  # padding ids may be out of range
    return (logp.gather(2, t.unsqueeze(-1)).squeeze(-1) * target_mask.to(acc)).sum(dim=1)
