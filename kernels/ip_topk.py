"""Fused exact inner-product top-k: the B x N score matrix is never written.

Grid = (query blocks, splits of N). Each program streams its slice of the index in [BLOCK_N, D] tiles,
scores them against BLOCK_B queries with ``tl.dot`` (float32 accumulation), packs (score, id) into sortable
int64 keys and folds each tile into a running per-query top-KP held in registers (KP = next power of two >= k)
by max extraction that stops as soon as no query improves. The per-split lists ([B, splits, KP] int64, the
only extra memory) are merged by a second kernel, which sorts, unpacks and slices KP down to k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import check_ip_topk_args

KEY_MIN = tl.constexpr(-(2**63))  # below every real key: excluded, padding and retired slots


@triton.jit
def _pack(scores, ids):
    """(float32 score, id) -> int64 key; integer order = (score desc, id asc). Same packing as reference.py."""
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 ties with +0.0
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (4294967295 - ids.to(tl.int64))


@triton.jit
def _unpack(keys):
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    low = keys & 4294967295
    return bits.to(tl.float32, bitcast=True), 4294967295 - low


@triton.jit
def _fold(run, cand, KP: tl.constexpr):
    """Fold candidate keys [R, C] into an (unsorted) running top-KP [R, KP] by repeated max extraction.

    Each round moves every row's best remaining candidate over that row's current minimum, if it is larger,
    and retires it from ``cand``; it stops when no row improves. Past the first tiles of a stream that is a
    round or two, where a sorting network would pay its full depth on every tile. (tl.sort/tl.topk also run
    ~100x slower than this in the interpreter, which the tests depend on.)
    """
    cols = tl.arange(0, KP)[None, :]
    th = tl.min(run, axis=1)
    best = tl.max(cand, axis=1)
    while tl.max((best > th).to(tl.int32), axis=0) > 0:
        slot = tl.min(tl.where(run == th[:, None], cols, KP), axis=1)
        run = tl.where((cols == slot[:, None]) & (best > th)[:, None], best[:, None], run)
        cand = tl.where(cand == best[:, None], KEY_MIN, cand)
        th = tl.min(run, axis=1)
        best = tl.max(cand, axis=1)
    return run


@triton.jit
def _ip_topk_partial_kernel(
    Q, X, EXCL, PART,
    B, N, D, rows_per_split,
    stride_qb, stride_qd, stride_xn, stride_xd,
    IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)

    qrows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    qmask = qrows < B
    excl = tl.load(EXCL + qrows, mask=qmask, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = Q + qrows.to(tl.int64)[:, None] * stride_qb

    run = tl.full((BLOCK_B, KP), KEY_MIN, tl.int64)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, N)
    for start in range(lo, hi, BLOCK_N):
        rows = start + offs_n
        rmask = rows < hi
        x_base = X + rows.to(tl.int64)[None, :] * stride_xn
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            dmask = cols < D
            qt = tl.load(q_base + cols[None, :] * stride_qd, mask=qmask[:, None] & dmask[None, :], other=0.0)
            xt = tl.load(x_base + cols[:, None] * stride_xd, mask=dmask[:, None] & rmask[None, :], other=0.0)
            if DOT_FP32:
                qt = qt.to(tl.float32)
                xt = xt.to(tl.float32)
            if IEEE or DOT_FP32:
                acc = tl.dot(qt, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(qt, xt, acc)
        keys = _pack(acc, rows[None, :])
        # padding query rows are dead too, or they would keep the fold loop busy for nothing
        dead = (rows[None, :] == excl[:, None]) | (rows[None, :] >= hi) | ~qmask[:, None]
        keys = tl.where(dead, KEY_MIN, keys)
        run = _fold(run, keys, KP)

    out = PART + (qrows.to(tl.int64)[:, None] * n_splits + split) * KP + tl.arange(0, KP)[None, :]
    tl.store(out, run, mask=qmask[:, None])


@triton.jit
def _ip_topk_merge_kernel(
    PART, SCORES, IDS, B, n_part, k,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, KP: tl.constexpr,
):
    """BLOCK_Q queries per program: top-k of each query's n_part = splits * KP partial keys, sorted, unpacked."""
    qrows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = qrows < B
    base = PART + qrows.to(tl.int64)[:, None] * n_part
    offs = tl.arange(0, BLOCK_M)[None, :]
    cols = tl.arange(0, KP)[None, :]
    run = tl.full((BLOCK_Q, KP), KEY_MIN, tl.int64)
    for m0 in range(0, n_part, BLOCK_M):
        cand = tl.load(base + m0 + offs, mask=qmask[:, None] & ((m0 + offs) < n_part), other=KEY_MIN)
        run = _fold(run, cand, KP)
    # selection sort, descending: k rounds over KP keys is nothing next to the stream
    out = tl.full((BLOCK_Q, KP), KEY_MIN, tl.int64)
    for j in range(0, k):
        best = tl.max(run, axis=1)
        out = tl.where(cols == j, best[:, None], out)
        run = tl.where(run == best[:, None], KEY_MIN, run)
    scores, ids = _unpack(out)
    dst = qrows.to(tl.int64)[:, None] * k + cols
    smask = qmask[:, None] & (cols < k)
    tl.store(SCORES + dst, scores, mask=smask)
    tl.store(IDS + dst, ids, mask=smask)


# ----------------------------------------------------------------------------------------------------------------
# launchers

def kp_for(k: int) -> int:
    """Running-list width: the next power of two >= k (tl.arange needs one), at least 8; the merge slices it to k.

    The floor of 8 costs k < 8 a few extra extraction rounds on the first tile and saves three compiled variants
    per block config (AOT check time, JIT warm-up).
    """
    return max(8, triton.next_power_of_2(k))


def default_config(b: int) -> dict:
    """Launch config for a GPU: two configs in all keep the AOT check and the JIT cache small.

    Small B is bandwidth-bound: a 16-row dot (the tl.dot minimum) wastes MMA lanes but not bytes. BLOCK_D=32 and
    8 warps at BLOCK_B=64 are what keep every dtype/KP variant spill-free on sm_90 (ptxas -v: <= 202 registers
    for fp32, <= 176 for bf16/fp16; BLOCK_D=64 or 4 warps spilled at KP=64).
    """
    if b <= 16:
        return dict(block_b=16, block_n=64, block_d=32, num_warps=4, num_stages=2)
    return dict(block_b=64, block_n=64, block_d=32, num_warps=8, num_stages=2)


def _interpreting() -> bool:
    """Triton 3.9's interpreter multiplies bf16 tiles as raw uint16 bits, so there they are upcast first.

    bf16 x bf16 products are exact in float32, so the upcast changes nothing but summation order; GPU launches
    keep the bf16 tensor-core dot.
    """
    return triton.knobs.runtime.interpret


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs, each a long stream, is the cheapest to simulate


def _ip_topk_forward(q, index, k, exclude=None, splits=None, **config):
    """config overrides default_config (block_b, block_n, block_d, num_warps, num_stages): tests shrink blocks."""
    check_ip_topk_args(q, index, k, exclude)
    b, d = q.shape
    n = index.shape[0]
    kp = kp_for(k)
    config = {**default_config(b), **{key: v for key, v in config.items() if v is not None}}
    block_b, block_n, block_d = config["block_b"], config["block_n"], config["block_d"]
    n_qblocks = triton.cdiv(b, block_b)
    n_tiles = triton.cdiv(n, block_n)
    if splits is None:
        # enough programs to fill the GPU ~4x over, each still streaming >= 4 tiles so partial lists stay small
        splits = max(1, min(triton.cdiv(4 * _num_sms(q.device), n_qblocks), triton.cdiv(n_tiles, 4)))
    splits = max(1, min(splits, n_tiles))
    rows_per_split = triton.cdiv(n_tiles, splits) * block_n
    splits = triton.cdiv(n, rows_per_split)

    # Always an exclusion vector (-1 = none): one [B] buffer is cheaper than doubling the compiled variants.
    if exclude is None:
        excl = torch.full((b,), -1, dtype=torch.int64, device=q.device)
    else:
        excl = exclude.to(device=q.device, dtype=torch.int64).contiguous()
    part = torch.empty((b, splits, kp), dtype=torch.int64, device=q.device)
    _ip_topk_partial_kernel[(n_qblocks, splits)](
        q, index, excl, part,
        b, n, d, rows_per_split,
        q.stride(0), q.stride(1), index.stride(0), index.stride(1),
        IEEE=q.dtype == torch.float32, DOT_FP32=q.dtype == torch.bfloat16 and _interpreting(),
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, KP=kp,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    scores = torch.empty((b, k), dtype=torch.float32, device=q.device)
    ids = torch.empty((b, k), dtype=torch.int64, device=q.device)
    n_part = splits * kp
    merge_q, merge_m = merge_blocks(interpret=_interpreting())
    _ip_topk_merge_kernel[(triton.cdiv(b, merge_q),)](
        part, scores, ids, b, n_part, k, BLOCK_Q=merge_q, BLOCK_M=merge_m, KP=kp, num_warps=4)
    return scores, ids


def merge_blocks(interpret: bool = False) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M) of the merge: fixed, so it has one config per KP. The interpreter pays per op, not per
    lane, so there it takes many queries per program."""
    return (64, 128) if interpret else (8, 64)  # (8, 128) spilled at KP=32 on sm_90


def launch_configs():
    """Every (kernel, signature, constexprs, options) the launcher above can produce on a GPU, for the AOT check.

    Strides are compiled both generic and specialised to 1 (Triton's launch-time specialisation of a
    contiguous last dim), so non-contiguous inputs are covered too.
    """
    kps = sorted({kp_for(k) for k in range(1, 65)})
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    sig = {"EXCL": "*i64", "PART": "*i64", "B": "i32", "N": "i32", "D": "i32", "rows_per_split": "i32",
           "stride_qb": "i32", "stride_qd": "i32", "stride_xn": "i32", "stride_xd": "i32"}
    configs = {tuple(sorted(default_config(b).items())) for b in range(1, 129)}
    for dtype, name in names.items():
        for i, cfg in enumerate(sorted(configs)):
            cfg = dict(cfg)
            opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            for j, kp in enumerate(kps):
                const = {"IEEE": dtype == torch.float32, "DOT_FP32": False, "BLOCK_B": cfg["block_b"],
                         "BLOCK_N": cfg["block_n"], "BLOCK_D": cfg["block_d"], "KP": kp}
                typed = {"Q": f"*{name}", "X": f"*{name}", **sig}
                yield _ip_topk_partial_kernel, typed, {**const, "stride_qd": 1, "stride_xd": 1}, opts
                if i == 0 and j == 0:
                    yield _ip_topk_partial_kernel, typed, const, opts
    merge_q, merge_m = merge_blocks()
    for kp in kps:
        yield (_ip_topk_merge_kernel,
               {"PART": "*i64", "SCORES": "*fp32", "IDS": "*i64", "B": "i32", "n_part": "i32", "k": "i32"},
               {"BLOCK_Q": merge_q, "BLOCK_M": merge_m, "KP": kp}, {"num_warps": 4})


def ip_topk_triton(q, index, k, exclude=None, **launch):
    """Triton ip_topk; no autograd (scores are a search result, see reference.ip_topk_reference)."""
    with torch.no_grad():
        return _ip_topk_forward(q, index, k, exclude, **launch)
