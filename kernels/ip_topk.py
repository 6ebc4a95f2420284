"""Fused exact inner-product top-k: the B x N score matrix is never written.

Grid = (query blocks, splits of N). A program loads its BLOCK_B queries once ([BLOCK_B, D], D a constexpr) and
streams its slice of the index through one plain loop that Triton's pipeliner can software-pipeline (no loop
inside it: ``tl.range(num_stages >= 3)`` turns the tile loads into a ring of cp.async copies on sm_80 / sm_90).
Per [BLOCK_N, D] tile: one ``tl.dot`` over K = D (float32 accumulation), a per-row max, and a compare with each
query's threshold, the float32 score of its current k-th best. Only a tile that beats some query's threshold takes
the branch (block-uniform: one reduction decides for the whole program) that packs (score, id) into sortable int64
keys and merges them into the running, sorted top-KP with bitonic networks (``_topk``, ``_bitonic``: tl.topk's
network, no data-dependent loop). Programs also share bounds per query (atomic maxima of their k-th and best
scores), so a short stream skips what others have already beaten; ``merge_counts`` measures how many tiles still
take the branch. Each program writes its top-k keys ([B, splits, k] int64, the only extra memory) and
``torch.topk`` over those unique keys is the final merge: it spreads a long row over many thread blocks, so at
B = 1 the merge still uses the whole GPU.

A strict ``score > threshold`` is exact, ties included: a program visits its ids in increasing order, so a later
row that ties the k-th best score has a higher id and loses the tie anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import MAX_D, check_ip_topk_args, unpack_keys

KEY_MIN = tl.constexpr(-(2**63))  # below every real key: excluded rows, padding, empty slots
SLOTS = tl.constexpr(16)  # most slots of the shared bound per query (see SHARE in the kernel)


@triton.jit
def _pack(scores, ids):
    """(float32 score, id) -> int64 key; integer order = (score desc, id asc). Same packing as reference.py."""
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 ties with +0.0
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (4294967295 - ids.to(tl.int64))


@triton.jit
def _score_of(keys):
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1  # powers of two only


@triton.jit
def _bitonic(x, stage: tl.constexpr, ORDER: tl.constexpr):
    """One bitonic merge of x [R, C]: compare-and-swap at column distances 2**(stage-1), ..., 2, 1, into runs of
    2**stage columns sorted ascending (ORDER 0), descending (1), or alternating, ascending first (2).

    An element's partner (column c ^ j) is (pair sum) - self over a [R, C / 2j, 2, j] view, exact for int64 keys
    because integer adds wrap. tl.sort / tl.topk get it from an xor reduction over a 2 x 2 x ... hypercube view,
    which Triton's interpreter runs as a Python loop per element (seconds per network on a small tile, FACTS.md)
    and which the compiler lowers slowly at high rank (a minute per config at [64, 64]); the add reduction is one
    numpy call in the interpreter (it recognises Triton's own add combiner) and, on a GPU, one shuffle or register
    move per exchange like the xor.
    """
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    col = tl.arange(0, C)[None, :]
    if ORDER == 2:
        flip = (col >> stage) & 1
    else:
        flip = ORDER
    for i in tl.static_range(stage - 1, -1, -1):
        v = tl.reshape(x, (R, C >> (i + 1), 2, 1 << i))
        partner = tl.reshape(tl.reduce(v, 2, tl.standard._sum_combine, keep_dims=True) - v, (R, C))
        right = (col >> i) & 1
        x = tl.where((x > partner) != ((flip ^ right) != 0), partner, x)
    return x


@triton.jit
def _topk(x, K: tl.constexpr, DESC: tl.constexpr):
    """The K largest of each row of x [R, C] (powers of two), sorted descending (DESC) or ascending: tl.topk's
    network (bitonic sort of runs of K, then halve by pairwise max of neighbouring runs and re-merge) with
    ``_bitonic``'s exchange."""
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    for t in tl.static_range(1, log_k + 1):
        x = _bitonic(x, t, DESC if t == log_n else 2)
    for t in tl.static_range(log_k + 1, log_n + 1):
        x = tl.max(tl.reshape(x, (x.shape[0], x.shape[1] >> (log_k + 1), 2, K)), axis=2)
        x = _bitonic(tl.reshape(x, (x.shape[0], x.shape[1] * K)), log_k, DESC if t == log_n else 2)
    return x


@triton.jit
def _merge(run, scores, rows, dead, BLOCK_B: tl.constexpr, KP: tl.constexpr):
    """Top-KP of (running top-KP, this tile), sorted descending, with no loop: the tile's top-KP sorted ascending,
    then the pairwise max with the descending run (the top KP of both, as a bitonic sequence) and one merge."""
    keys = tl.where(dead, KEY_MIN, _pack(scores, rows[None, :]))
    for _ in tl.static_range(_log2(KP) - _log2(keys.shape[1])):  # a tile narrower than KP: pad with empty slots
        keys = tl.reshape(tl.join(keys, tl.full(keys.shape, KEY_MIN, tl.int64)), (BLOCK_B, 2 * keys.shape[1]))
    best = _topk(keys, KP, 0)
    return _bitonic(tl.maximum(run, best), _log2(KP), 1)


@triton.jit
def _ip_topk_stream_kernel(
    Q, X, EXCL, BAR, PART, MERGES,
    B, N, k, rows_per_split, n_slots,
    stride_qb, stride_qd, stride_xn, stride_xd,
    D: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SHARE: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)

    qrows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    qmask = qrows < B
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D  # all true when D is a power of two: folded away
    q = tl.load(Q + qrows.to(tl.int64)[:, None] * stride_qb + offs_d[None, :] * stride_qd,
                mask=qmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    excl = tl.load(EXCL + qrows, mask=qmask, other=-1)
    cols = tl.arange(0, KP)[None, :]

    run = tl.full((BLOCK_B, KP), KEY_MIN, tl.int64)
    thr = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    bar = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    merges = 0
    # int64 row arithmetic throughout: N may exceed 2**31 (ids are packed in 32 bits, so up to 2**32 - 2)
    lo = split.to(tl.int64) * rows_per_split
    hi = tl.minimum(lo + rows_per_split, N)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        rows = start + offs_n
        rmask = rows < hi
        x = tl.load(X + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        scores = tl.dot(q, tl.trans(x), input_precision=PRECISION)
        # The hot path is this compare: padding rows score 0 and the excluded row scores for real here, so a tile
        # may take the branch for them needlessly (once per stream), never wrongly: the merge masks them.
        # thr == -inf: fewer than k results yet (or a real -inf k-th score), so every tile is a candidate.
        best = tl.max(scores, axis=1)
        beats = ((best > thr) | (thr == float("-inf"))) & (best >= bar) & qmask
        if tl.max(beats.to(tl.int32), axis=0) > 0:
            dead = (rows[None, :] == excl[:, None]) | ~rmask[None, :]
            run = _merge(run, scores, rows, dead, BLOCK_B, KP)
            kth = tl.sum(tl.where(cols == k - 1, run, 0), axis=1)
            thr = tl.where(kth == KEY_MIN, float("-inf"), _score_of(kth))
            if SHARE:
                # Share bounds per query: a score below ``bar`` cannot make the global top k (one equal to it can,
                # with a lower id: hence >= above), because k results elsewhere score >= bar. Two such bounds: the
                # best k-th score any program has published (BAR[:, 0]); and the lowest of S <= SLOTS slots
                # (BAR[:, 1:S+1]), slot j holding the best j'-th score (j' = ceil(k / S)) of any program with
                # split % S == j: S distinct programs hold j' results each above it. A short stream's own threshold
                # alone rises slowly; the slots rise with the maxima of all programs. (SLOTS, not KP, wide: a
                # [64, 64] float tile of slots made 64-query fp32 configs spill on sm_90.)
                mine = tl.sum(tl.where(cols == (k - 1) // n_slots, run, 0), axis=1)
                mine = tl.where(mine == KEY_MIN, float("-inf"), _score_of(mine))
                row = BAR + qrows.to(tl.int64) * (KP + 1)
                seen = tl.atomic_max(row, thr, mask=qmask, sem="relaxed")
                tl.atomic_max(row + 1 + split % n_slots, mine, mask=qmask, sem="relaxed")
                scol = tl.arange(0, SLOTS)[None, :]
                slots = tl.load(row[:, None] + 1 + scol, mask=qmask[:, None] & (scol < n_slots), other=float("inf"))
                bar = tl.maximum(tl.maximum(seen, thr), tl.min(slots, axis=1))
            if COUNT:
                merges += 1

    out = PART + (qrows.to(tl.int64)[:, None] * n_splits + split) * k + cols
    tl.store(out, run, mask=qmask[:, None] & (cols < k))
    if COUNT:
        tl.store(MERGES + pid_b * n_splits + split, merges)


# ----------------------------------------------------------------------------------------------------------------
# configs

# Candidates per (batch bucket, element size), autotuned on a GPU per (bucket, D, dtype, KP); buckets are B <= 16 and
# B > 16. Every candidate is compiled for sm_80 and sm_90 by the AOT check (kernels/aot.py: no spills, async copies
# in the stream loop, shared memory and registers reported). Small B is bandwidth-bound: the 16-row dot (tl.dot's
# minimum) wastes MMA lanes, not bytes, and long tiles in a deep pipeline keep more bytes in flight per SM. fp32
# keeps 16 x 32 tiles at every B: tf32x3 splits each operand in two, and before sm_90 the dot's operands live in
# registers (mma.sync), where a 16-row x 128-deep fp32 query tile split in two already takes 128 of them; 32 or
# 64 query rows spilled on sm_80, and 64 (wgmma) on sm_90 once the shared bounds were in. 16 x 128 and 64 x 64
# 16-bit tiles take 8 warps: with 4 the merge network's keys spilled (16 x 128: sm_80 at KP = 32; 64 x 64: sm_80
# from KP = 16, sm_90 at KP = 64). The first candidate of a bucket is the interpreter's and the one whose generic
# (unaligned, strided) variant the AOT check compiles: 16 x 128's spilled on sm_90 (no cp.async there, so the
# pipeline's tiles sit in registers).
B_BUCKETS = (16,)
CONFIGS = {
    (0, 2): (dict(block_b=16, block_n=64, num_warps=4, num_stages=4),
             dict(block_b=16, block_n=128, num_warps=8, num_stages=3)),
    (0, 4): (dict(block_b=16, block_n=32, num_warps=4, num_stages=4),),
    (1, 2): (dict(block_b=64, block_n=64, num_warps=8, num_stages=3),
             dict(block_b=64, block_n=64, num_warps=8, num_stages=4)),
    (1, 4): (dict(block_b=16, block_n=32, num_warps=4, num_stages=4),),
}
# Shared memory a config may plan for: sm_80 has 163 KiB per block (sm_90 227 KiB), less Triton's scratch.
SMEM_BUDGET = 160 * 1024


def b_bucket(b: int) -> int:
    return sum(b > edge for edge in B_BUCKETS)


def kp_for(k: int) -> int:
    """Running-list width: the next power of two >= k (the networks need one), at least 8; results keep the first k.

    The floor of 8 costs k < 8 nothing measurable (the merge is rare) and saves three compiled variants per config.
    """
    return max(8, triton.next_power_of_2(k))


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16


def smem_bytes(cfg: dict, d: int, esize: int) -> int:
    """An upper bound on the shared memory a config takes (the AOT report has the compiler's numbers): num_stages
    index tiles, plus the query tile and one index tile for the MMA operands, twice for fp32 (tf32x3's split)."""
    tile = block_d(d) * esize
    return cfg["num_stages"] * cfg["block_n"] * tile + (cfg["block_b"] + cfg["block_n"]) * tile * (esize // 2)


def candidates(b: int, d: int, esize: int) -> list[dict]:
    """The bucket's launch configs that fit the shared-memory budget at this D and element size (fewer stages if
    none does)."""
    cands = [dict(c) for c in CONFIGS[b_bucket(b), min(esize, 4)]]
    fits = [c for c in cands if smem_bytes(c, d, esize) <= SMEM_BUDGET]
    if fits:
        return fits
    c = dict(cands[-1], block_n=min(cands[-1]["block_n"], 64))
    while c["num_stages"] > 2 and smem_bytes(c, d, esize) > SMEM_BUDGET:
        c["num_stages"] -= 1
    return [c]


def default_config(b: int, d: int = 128, esize: int = 4) -> dict:
    return candidates(b, d, esize)[0]


def _interpreting() -> bool:
    """Triton 3.9's interpreter multiplies bf16 tiles as raw uint16 bits, so there they are upcast first.

    bf16 x bf16 products are exact in float32, so the upcast changes nothing but summation order; GPU launches
    keep the bf16 tensor-core dot.
    """
    return triton.knobs.runtime.interpret


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: tf32x3 (three tf32 tensor-core products, ~fp32 accuracy) instead of "ieee", which has no tensor
    cores. 16-bit inputs: their products are exact in the fp32 accumulator, the plain dot is exact."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs, each a long stream, is the cheapest to simulate


def _triton_config(c: dict) -> triton.Config:
    return triton.Config({"BLOCK_B": c["block_b"], "BLOCK_N": c["block_n"], "NUM_STAGES": c["num_stages"]},
                         num_warps=c["num_warps"], num_stages=c["num_stages"])


def _reset_bar(nargs, reset_only=False):
    """Autotuner hook: each timed run starts from no shared threshold, as a real call does."""
    nargs["BAR"].fill_(float("-inf"))


_TUNED: dict = {}


def _tuned(cands: list[dict]):
    """One autotuner per candidate list (bucket, element size, what fits at D): the list picks the configs, the
    autotuner's key adds D, KP and the dtypes."""
    key = tuple(tuple(sorted(c.items())) for c in cands)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune([_triton_config(c) for c in cands], key=["D", "KP"],
                                      pre_hook=_reset_bar)(_ip_topk_stream_kernel)
    return _TUNED[key]


# ----------------------------------------------------------------------------------------------------------------
# launcher

def _ip_topk_forward(q, index, k, exclude=None, splits=None, merges=None, share=True, **config):
    """config (block_b, block_n, num_warps, num_stages) fixes the launch; without it a GPU launch is autotuned over
    the bucket's candidates and the interpreter takes the first. ``merges`` (int32 tensor, [query blocks * splits])
    receives each program's count of merge-branch entries (a measurement; compiled out otherwise); ``share=False``
    keeps each program to its own threshold (a measurement too)."""
    check_ip_topk_args(q, index, k, exclude)
    b, d = q.shape
    n = index.shape[0]
    if d > MAX_D:
        raise ValueError(f"ip_topk_triton: D={d} > {MAX_D}; kernels.ip_topk runs the reference for it")
    kp = kp_for(k)
    explicit = {key: v for key, v in config.items() if v is not None}
    cands = candidates(b, d, q.element_size())
    fixed = bool(explicit) or _interpreting() or merges is not None
    cfg = {**cands[0], **explicit}
    # splits are cut at a multiple of every candidate's BLOCK_N, so the autotuner's choice does not move them
    quantum = cfg["block_n"] if fixed else max(c["block_n"] for c in cands)
    n_qblocks, splits, rows_per_split = _plan(b, n, cfg["block_b"], quantum, splits, q.device)

    # Always an exclusion vector (-1 = none): one [B] buffer is cheaper than doubling the compiled variants.
    if exclude is None:
        excl = torch.full((b,), -1, dtype=torch.int64, device=q.device)
    else:
        excl = exclude.to(device=q.device, dtype=torch.int64).contiguous()
    part = torch.empty((b, splits, k), dtype=torch.int64, device=q.device)
    bar = torch.full((b, kp + 1), float("-inf"), dtype=torch.float32, device=q.device)  # see SHARE in the kernel
    count = merges is not None
    if count and merges.numel() != n_qblocks * splits:
        raise ValueError(f"merges must hold {n_qblocks * splits} counts (query blocks x splits)")
    counts = merges if count else part  # never written without COUNT
    # slots for the shared bound (see SHARE in the kernel): ~4 programs a slot, at most k and the kernel's SLOTS
    n_slots = max(1, min(k, SLOTS.value, splits // 4))
    args = (q, index, excl, bar, part, counts, b, n, k, rows_per_split, n_slots,
            q.stride(0), q.stride(1), index.stride(0), index.stride(1))
    const = dict(D=d, BLOCK_D=block_d(d), KP=kp, PRECISION=_precision(q.dtype), COUNT=count, SHARE=share,
                 UPCAST=q.dtype == torch.bfloat16 and _interpreting())
    if fixed:
        _ip_topk_stream_kernel[(n_qblocks, splits)](
            *args, **const, BLOCK_B=cfg["block_b"], BLOCK_N=cfg["block_n"], NUM_STAGES=cfg["num_stages"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        _tuned(cands)[lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), splits)](*args, **const)
    keys = part.view(b, splits * k)
    if splits > 1:  # one split's list is already sorted
        keys = keys.topk(k, dim=1, sorted=True).values
    return unpack_keys(keys)


def _plan(b: int, n: int, block_b: int, quantum: int, splits: int | None, device) -> tuple[int, int, int]:
    """(query blocks, splits, rows per split): splits cut N at multiples of ``quantum`` rows."""
    n_qblocks = triton.cdiv(b, block_b)
    n_tiles = triton.cdiv(n, quantum)
    if splits is None:
        # enough programs to fill the GPU ~4x over, each still streaming >= 4 tiles so partial lists stay small
        splits = max(1, min(triton.cdiv(4 * _num_sms(device), n_qblocks), triton.cdiv(n_tiles, 4)))
    splits = max(1, min(splits, n_tiles))
    rows_per_split = triton.cdiv(n_tiles, splits) * quantum
    return n_qblocks, triton.cdiv(n, rows_per_split), rows_per_split


def merge_counts(q, index, k, splits=None, share=True, **config) -> tuple[int, int]:
    """(merge-branch entries, tiles streamed), summed over programs: how often the threshold lets a tile through.

    Runs the kernel once with the counter compiled in; config as for ip_topk_triton (default: the first candidate).
    The interpreter runs programs one after another, so with ``share`` each sees every earlier program's final
    threshold: a best case for the shared bar; ``share=False`` is the worst case (no program sees another's).
    """
    b, n = q.shape[0], index.shape[0]
    cfg = {**default_config(b, q.shape[1], q.element_size()), **{key: v for key, v in config.items() if v}}
    n_qblocks, splits, _ = _plan(b, n, cfg["block_b"], cfg["block_n"], splits, q.device)
    merges = torch.zeros(n_qblocks * splits, dtype=torch.int32, device=q.device)
    _ip_topk_forward(q, index, k, merges=merges, splits=splits, share=share, **cfg)
    return int(merges.sum()), n_qblocks * triton.cdiv(n, cfg["block_n"])


def launch_configs():
    """Every compiled variant a GPU launch at D = 128 can produce, for the AOT check (kernels/aot.py): dicts of
    kernel, signature, constexprs, options, the arguments a launch specialises as multiples of 16 (``divisible``:
    Triton does so for aligned pointers and such ints, and only then are loads wide enough for cp.async) and
    ``stream`` (the kernel's main loop must issue async copies).

    Per config: contiguous rows (stride 1 specialised, row strides of D = 128 divisible). Once per dtype: fully
    generic arguments (non-contiguous or unaligned views) and B = 1 (Triton specialises an int equal to 1).
    Row counts are i32 as Triton passes N < 2**31; the kernel widens them to int64 itself.
    """
    kps = sorted({kp_for(k) for k in range(1, 65)})
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    sig = {"EXCL": "*i64", "BAR": "*fp32", "PART": "*i64", "MERGES": "*i64", "B": "i32", "N": "i32", "k": "i32",
           "rows_per_split": "i32", "n_slots": "i32", "stride_qb": "i32", "stride_qd": "i32", "stride_xn": "i32",
           "stride_xd": "i32"}
    pointers = ("Q", "X", "EXCL", "BAR", "PART", "MERGES")
    d = 128
    for dtype, name in names.items():
        esize = torch.empty((), dtype=dtype).element_size()
        typed = {"Q": f"*{name}", "X": f"*{name}", **sig}
        configs = []  # this dtype's candidates over both buckets, each once
        for (_, size), cands in CONFIGS.items():
            configs += [c for c in cands if size == min(esize, 4) and c not in configs
                        and smem_bytes(c, d, esize) <= SMEM_BUDGET]
        for j, cfg in enumerate(configs):
            opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            for kp in kps:
                const = {"D": d, "BLOCK_D": block_d(d), "KP": kp, "PRECISION": _precision(dtype),
                         "UPCAST": False, "SHARE": True, "COUNT": False, "BLOCK_B": cfg["block_b"],
                         "BLOCK_N": cfg["block_n"], "NUM_STAGES": cfg["num_stages"]}
                common = dict(kernel=_ip_topk_stream_kernel, signature=typed, options=opts, stream=True)
                yield dict(common, constexprs={**const, "stride_qd": 1, "stride_xd": 1},
                           divisible=pointers + ("stride_qb", "stride_xn", "rows_per_split"))
                if j == 0 and kp == kps[0]:  # the first config of a dtype
                    # 2-byte elements at unknown alignment cannot be copied asynchronously (cp.async moves 4, 8
                    # or 16 bytes): a generic 16-bit variant only has to compile without spills
                    yield dict(common, constexprs=const, divisible=(), stream=esize == 4)
                    yield dict(common, constexprs={**const, "B": 1, "stride_qd": 1, "stride_xd": 1},
                               divisible=pointers + ("stride_qb", "stride_xn", "rows_per_split"))


def ip_topk_triton(q, index, k, exclude=None, **launch):
    """Triton ip_topk; no autograd (scores are a search result, see reference.ip_topk_reference)."""
    with torch.no_grad():
        return _ip_topk_forward(q, index, k, exclude, **launch)
