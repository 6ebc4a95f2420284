"""Index backends behind one interface: ``build_backend(name, embeddings, **params) -> Backend``.

Every backend answers ``search(queries [B, D], k, exclude=None) -> (scores float32 [B, k], ids int64 [B, k])``,
scores descending, as torch tensors (on the embeddings' device for ``exact``, on the CPU for faiss). ``exclude``
(int64 [B], -1 = none) is REALM's trivial-retrieval exclusion: that id is never returned and k results still
come back (faiss backends ask for k + 1 and drop it).

- ``exact``: ``kernels.ip_topk`` (Triton on CUDA). On CPU, a sharded search that beats faiss-cpu ``IndexFlatIP``
  at every batch size (see ``CPUExactSearch``) and returns ``kernels.ip_topk``'s answer: exact ties go to the lower
  id; like Triton vs the torch reference, only scores within float32 rounding of each other may swap (a different
  summation order: torch's own matmul rounds differently for 1 query than for 8).
- ``faiss-flat``: faiss ``IndexFlatIP`` (``GpuIndexFlatIP`` with faiss-gpu and CUDA), as faiss ships it: the baseline.
- ``faiss-ivfpq``: ``IndexIVFPQ`` wrapped in ``IndexRefineFlat`` *before* adding vectors (IVF-PQ alone has poor
  recall; the flat re-rank of k * k_factor candidates fixes it), trained on a seeded sample.

Tie order: results are sorted by (score desc, id asc) through the packed keys of kernels.reference, so equal
scores come back lowest id first from every backend.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from kernels.reference import KEY_MIN, _chunk_topk, pack_keys, unpack_keys  # the reference's own selection:
# the same packed keys and tie handling, so the CPU search breaks ties exactly as kernels.ip_topk does

# ----------------------------------------------------------------------------------------------------- helpers


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:  # the package's [cpu] / [gpu] extra
        raise RuntimeError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.contiguous()


def _as_float32_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _exclude_tensor(exclude, b: int) -> torch.Tensor | None:
    if exclude is None:
        return None
    e = _as_tensor(exclude).to(device="cpu", dtype=torch.int64).reshape(-1)
    if e.shape != (b,):
        raise ValueError(f"exclude must be [B]={b}, got {tuple(e.shape)}")
    return e


def _check_search(b_shape, d: int, n: int, k: int, exclude: torch.Tensor | None) -> None:
    if len(b_shape) != 2 or b_shape[1] != d:
        raise ValueError(f"queries must be [B, {d}], got {tuple(b_shape)}")
    if b_shape[0] < 1:
        raise ValueError("need at least one query")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} > N={n} index rows")
    if k == n and exclude is not None and bool(((exclude >= 0) & (exclude < n)).any()):
        raise ValueError(f"k={k} == N and an id is excluded: fewer than k results exist")


def _keys_from(scores, ids, exclude: torch.Tensor | None) -> torch.Tensor:
    """faiss (scores, ids) -> packed keys; missing (-1) and excluded ids become KEY_MIN."""
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    i = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
    dead = i < 0
    if exclude is not None:
        dead |= i == exclude[:, None]
    return pack_keys(s, i.clamp_min(0)).masked_fill(dead, KEY_MIN)


def _top_sorted(keys: torch.Tensor, k: int) -> torch.Tensor:
    return keys.topk(k, dim=1, sorted=True).values


def _kth_score(keys: torch.Tensor) -> torch.Tensor:
    """The smallest key's score per row; -inf where a slot is still empty (KEY_MIN unpacks to NaN)."""
    low = keys.min(dim=1).values
    return torch.where(low == KEY_MIN, float("-inf"), unpack_keys(low)[0])


# ----------------------------------------------------------------------------------------------------- interface


class Backend:
    """What every backend offers. ``params`` are what it was built with (for reports)."""

    name: str = ""

    def __init__(self, n: int, d: int, dtype: torch.dtype, params: dict):
        self.n, self.d, self.dtype, self.params = n, d, dtype, params
        self.build_s = 0.0

    def search(self, queries, k: int, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _faiss_query(self, queries, k: int, exclude):
        """(float32 queries, exclusion, how many to ask faiss for): one more than k when an id is excluded, so
        dropping it still leaves k."""
        q = _as_float32_numpy(queries)
        ex = _exclude_tensor(exclude, q.shape[0] if q.ndim == 2 else 0)
        _check_search(q.shape, self.d, self.n, k, ex)
        return q, ex, min(self.n, k + (ex is not None))

    def bytes_per_query(self, b: int, k: int) -> float:
        """Bytes a search must read per query at batch size b: the index once per batch (amortised) + the query."""
        esize = torch.empty((), dtype=self.dtype).element_size()
        return self.n * self.d * esize / b + self.d * esize

    def index_bytes(self) -> int:
        """Bytes the index structures hold (for exact: the rows it searches, shared with the caller's tensor)."""
        return self.n * self.d * torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> dict:
        return {"backend": self.name, **self.params}


# ------------------------------------------------------------------------------------------------------- exact


@dataclass(kw_only=True)
class ExactParams:
    dtype: str | None = None  # storage dtype: fp32 | bf16 | fp16 (None = the embeddings' own)
    threads: int | None = None  # CPU worker threads (None = torch.get_num_threads())
    cpu_path: str = "sharded"  # sharded (CPUExactSearch) | reference (kernels.ip_topk's torch path, slower)
    small_batch: int | None = None  # B below this uses faiss's per-query loop; None = by the index's size against
    # the last-level cache: 64 within a quarter of it (the loop streams from cache), 16 within it, else 8
    min_shard_rows: int = 2048  # fewer rows than threads * this: fewer shards
    small_work: int | None = None  # B * N * D multiply-adds up to which a search is one job in the caller's
    # thread; None = a quarter of the last-level cache's bytes (B = 1 over a float32 index that fits in it)
    chunk_elems: int = 1 << 20  # score block per chunk (B x C floats): 4 MiB stays in L2/L3
    team_bytes: int | None = None  # an index up to this size is searched by one faiss OpenMP team below the BLAS
    # threshold, not by shards; None = a quarter of the last-level cache, 0 = never
    bf16_filter: bool | None = None  # float32 rows: keep a bfloat16 copy (+50 % memory) that scores every row, and
    # re-score exactly the rows its rounding bound cannot rule out; None = where the CPU has AVX512-BF16 or AMX
    bf16_batches: list[int] | None = None  # [lo, hi]: batch sizes that use it; None = [32, no limit] for an index
    # within team_bytes (below 32 it streams from cache: faiss's loop is hard to beat), else [3, no limit]
    bf16_team: bool | None = None  # one search with torch's threads (True) or one per shard (False); None = the
    # index fits the last-level cache


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExactBackend(Backend):
    """Brute-force inner product over the rows as given (no copy for float32): kernels.ip_topk on CUDA (Triton),
    CPUExactSearch on CPU."""

    name = "exact"

    def __init__(self, embeddings, p: ExactParams):
        t0 = time.perf_counter()
        if p.dtype is not None and p.dtype not in DTYPES:
            raise ValueError(f"exact: dtype must be one of {sorted(DTYPES)}, got {p.dtype!r}")
        x = _as_tensor(embeddings, DTYPES.get(p.dtype))
        if x.dim() != 2:
            raise ValueError(f"embeddings must be [N, D], got {tuple(x.shape)}")
        if p.cpu_path not in ("sharded", "reference"):
            raise ValueError(f"exact: cpu_path must be sharded | reference, got {p.cpu_path!r}")
        super().__init__(x.shape[0], x.shape[1], x.dtype, dataclasses.asdict(p))
        self.x = x
        self._cpu = None
        if x.device.type == "cpu" and p.cpu_path != "reference":
            self._cpu = CPUExactSearch(x, threads=p.threads, small_batch=p.small_batch,
                                       min_shard_rows=p.min_shard_rows, chunk_elems=p.chunk_elems,
                                       small_work=p.small_work, team_bytes=p.team_bytes, bf16_filter=p.bf16_filter,
                                       bf16_batches=p.bf16_batches, bf16_team=p.bf16_team)
        self.build_s = time.perf_counter() - t0

    def search(self, queries, k, exclude=None):
        q = _as_tensor(queries).to(self.x.device)
        ex = _exclude_tensor(exclude, q.shape[0] if q.dim() == 2 else 0)
        _check_search(q.shape, self.d, self.n, k, ex)
        if self._cpu is None:
            return kernels.ip_topk(q.to(self.dtype), self.x, k, None if ex is None else ex.to(self.x.device))
        return self._cpu.search(q.to(self.dtype), k, ex)  # queries rounded to the index dtype, as ip_topk does

    def index_bytes(self) -> int:
        """The rows it searches (shared with the caller's tensor) and the CPU's bfloat16 copy where it keeps one."""
        extra = 0 if self._cpu is None or self._cpu._xb is None else self._cpu._xb.numel() * 2
        return super().index_bytes() + extra

    def bytes_per_query(self, b: int, k: int) -> float:
        """With the bfloat16 filter: its copy once per batch, the query, and at least k float32 rows re-scored."""
        if self._cpu is not None and self._cpu.method(b) == "bf16":
            return self.n * self.d * 2 / b + self.d * 4 + k * self.d * 4
        return super().bytes_per_query(b, k)


class CPUExactSearch:
    """Exact top-k on CPU, ``kernels.ip_topk``'s answer, split by arithmetic over T worker threads.

    Why not torch or faiss with their own OpenMP threads (FACTS, 1M x 128, 2 cores): torch matmul + topk loses
    ~3x to faiss at B=1 (MKL's gemv streams ~7 GB/s, faiss's per-query loop ~30 GB/s on one core) and ~2x at B=1024
    (torch.topk over every score); faiss loses ~2x at B=64 (below B*D = 128000 it streams the whole index once per
    query). And an OpenMP region per op, each with a barrier, collapses when another process holds a core (62 s
    instead of 1.7 s measured). So the index is cut into T contiguous shards, one per worker thread; each worker
    runs single-threaded kernels over its shard without synchronising until the merge of the T top-k lists.
    Per batch size, with faiss installed and float32 rows:

    - B * D >= faiss's BLAS threshold (B >= 1000 at D=128 in faiss 1.15): ``faiss.knn`` on the shard (its sgemm +
      heaps: 0.35-0.40 s for 1024 x 50k x 128 on one core of the 2-core EPYC, where torch.mm alone took 0.51-0.58 s;
      no copy of the index);
    - B < small_batch: ``faiss.knn`` too, i.e. its per-query loop: at B=1 it streams ~4x faster than MKL's gemv;
    - otherwise, and always without faiss: ``_shard_topk``, chunked matmul with a slab-max filter;
    - except below the BLAS threshold at B >= 2 for an index within ``team_bytes`` (a quarter of the LLC), or for a
      larger one at 2 <= B < small_batch: one ``faiss.knn`` over every row with faiss's own OpenMP team
      (``_team_search``).
    - before all of these, B within ``bf16_batches`` where the CPU multiplies bfloat16 (``_shard_bf16``): a
      bfloat16 copy of the rows scores them all (half the bytes to read, twice the multiply rate), and the few rows
      its rounding bound cannot rule out are re-scored in float32, so the answer is still exact. One search with
      torch's threads where the index fits the LLC (from TEAM_SLAB_FROM queries the heap gives way to slab maxima,
      ``_team_bf16``), else one per shard. 2-core EPYC (Zen 4), two bench runs (README), ratio to faiss-flat:
      50k x 128 at B = 4-1024 1.1-5.7x and 1M at B = 4-1024 1.5-9.8x, where the float32 paths had given 0.6-2.6x
      and 0.6-3.8x. Within team_bytes (10k) the heap gained only at B = 128-512: at B = 1024 bfloat16 matmul +
      conversion + heap + re-rank lost to faiss's sgemm; the slab maxima took that cell from 0.92-0.98x to
      1.41-1.76x (three runs on a Zen 5 VM, README), and B = 64-256 to 1.5-3.4x.

    faiss is asked for k + 2 so that exclusion and a tie at the k-th place are visible; a row tied there is redone
    by ``_shard_topk``, whose packed-key selection breaks ties to the lower id like the reference (``_faiss_topk``).
    Workers get one torch / OpenMP / MKL thread each, thread-locally: the caller's settings are left as they were.

    Small indexes are where per-call costs show (10k x 128 is ~0.3 ms of work at B=1): the caller's thread runs
    the first faiss job itself (faiss's OpenMP set to one thread for it, thread-locally, and put back), so a
    T-shard search wakes T - 1 workers, and a search of at most ``small_work`` multiply-adds is one job over every
    row, in the caller's thread: by default B = 1 over an index that fits the LLC (2-core EPYC, Zen 5, B = 1, one
    job vs two shards: 50k x 128 0.67-0.85 vs 1.0-1.8 ms, 64k 1.44 vs 1.87 ms, 100k 1.7 vs 2.2 ms, and beyond it
    200k 4.5 vs 4.1 ms, 1M 15.7 vs 13.1 ms). Shards are at least ``min_shard_rows`` rows.
    """

    SLAB = 16
    QUERY_BLOCK = 1024
    BF16_SPARE = 40  # heap slots past k for the rows the bfloat16 bound cannot rule out
    TEAM_SLAB_FROM = 32  # a team bfloat16 search of fewer queries keeps _shard_bf16's heap (less fixed cost)
    TEAM_CHUNK = 1 << 22  # _team_bf16: scores per chunk of queries (8 MiB as bfloat16)
    TEAM_CAP = 256  # _team_bf16: a query with more candidates than this + 4k goes to the heap

    def __init__(self, x: torch.Tensor, threads=None, small_batch=None, min_shard_rows=2048, chunk_elems=1 << 20,
                 small_work=None, team_bytes=None, bf16_filter=None, bf16_batches=None, bf16_team=None):
        self.x = x
        self.threads = max(1, threads or torch.get_num_threads())
        self.chunk_elems = chunk_elems
        n = x.shape[0]
        size, llc = x.numel() * x.element_size(), _last_level_cache_bytes()
        self._team_index = size <= (llc // 4 if team_bytes is None else team_bytes)
        self.small_work = llc // 4 if small_work is None else small_work
        n_shards = max(1, min(self.threads, n // max(1, min_shard_rows)))
        step = -(-n // n_shards)
        self.shards = [(a, min(a + step, n)) for a in range(0, n, step)]
        if small_batch is None:
            # where faiss's per-query loop stops beating the chunked matmul (interleaved, 2 shards, 32 MiB L3):
            # B ~64 at 10k x 128 fp32 (5 MiB), ~12 at 50k (26 MiB), ~6 at 1M
            small_batch = 64 if size <= llc // 4 else 16 if size <= llc else 8
        self.small_batch = small_batch
        self._faiss = None
        if x.dtype == torch.float32:
            try:
                import faiss

                self._faiss = faiss
                self._x_np = x.numpy()
                threshold = int(faiss.cvar.distance_compute_blas_threshold)
                # faiss 1.15 compares B * D with 128000; older releases compared B alone with 20
                self._blas_from = threshold if threshold >= 1000 else threshold * x.shape[1]
            except ImportError:
                pass
        self._xb = None
        if bf16_filter is None:
            bf16_filter = _cpu_has_bf16()
        if bf16_filter and self._faiss is not None and n > self.BF16_SPARE and bool(torch.isfinite(x).all()):
            norms = x.norm(dim=1)
            if float(norms.max()) < 2.0 ** 60:  # far from float32's range: no product or sum can overflow
                # padded with zero rows to whole slabs for _team_bf16 (its padding scores are masked; the shard
                # path reads rows below n only)
                self._xb = torch.zeros(-(-n // self.SLAB) * self.SLAB, x.shape[1], dtype=torch.bfloat16)
                self._xb[:n] = x
                # max |x| of every row range a search hands _shard_bf16: each shard, and all rows as one job
                self._norm_max = {(a, z): float(norms[a:z].max()) for a, z in self.shards + [(0, n)]}
        if bf16_batches is None:
            bf16_batches = (32 if self._team_index else 3, 1 << 62)
        if len(bf16_batches) != 2:
            raise ValueError(f"exact.bf16_batches must be [lo, hi], got {bf16_batches!r}")
        self.bf16_batches = tuple(bf16_batches)
        self.bf16_team = size <= llc if bf16_team is None else bf16_team
        self._pool = None
        self._pool_lock = threading.Lock()

    def method(self, b: int, bf16: bool = True) -> str:
        """bf16 (per shard or one team search) | faiss-team (one search, faiss's threads) | faiss | torch (per shard):
        what a batch of b queries runs (bf16=False: what it runs when the queries rule out the bfloat16 filter)."""
        if bf16 and self._xb is not None and self.bf16_batches[0] <= b <= self.bf16_batches[1]:
            return "bf16"
        if self._team_search(b):
            return "faiss-team"
        if self._faiss is not None and (b < self.small_batch or b * self.x.shape[1] >= self._blas_from):
            return "faiss"
        return "torch"

    # -- threads

    def _workers(self, jobs: int) -> ThreadPoolExecutor | None:
        # One job still goes to a worker when the caller runs several OpenMP threads (see the class docstring).
        if jobs == 1 and torch.get_num_threads() == 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = _single_threaded_pool(len(self.shards), self._faiss)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __del__(self):
        self.close()

    # -- search

    @torch.no_grad()
    def search(self, q: torch.Tensor, k: int, exclude: torch.Tensor | None):
        q = q.float().contiguous()
        b, n = q.shape[0], self.x.shape[0]
        method = self.method(b)
        if method == "bf16" and not bool((q.abs() < 2.0 ** 60).all()):  # inf / nan / near overflow: no error bound
            method = self.method(b, bf16=False)
        if method == "faiss-team":
            return self._in_caller(self._faiss_topk, q, 0, n, k, exclude, omp_threads=self.threads)
        if method == "bf16" and self.bf16_team:
            return unpack_keys(self._team_bf16(q, k, exclude))  # sorted best first
        shards = [(0, n)] if b * n * self.x.shape[1] <= self.small_work else self.shards
        jobs = [(a, z, min(k, z - a)) for a, z in shards]
        if method == "faiss":
            if len(jobs) == 1:  # one job, in the caller's thread: no merge
                return self._in_caller(self._faiss_topk, q, 0, n, k, exclude)
            run, mine = self._shard_faiss, jobs[:1]  # the caller's thread takes the first job
        else:
            run, mine = self._shard_bf16 if method == "bf16" else self._shard_torch, []
        rest = len(jobs) - len(mine)
        pool = self._workers(rest) if rest else None
        if pool is None:
            mine = jobs
        futures = [pool.submit(run, q, a, z, kk, exclude) for a, z, kk in jobs[len(mine):]] if pool else []
        parts = [self._in_caller(run, q, a, z, kk, exclude) for a, z, kk in mine] + [f.result() for f in futures]
        keys = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return unpack_keys(_top_sorted(keys, k))

    def _team_search(self, b: int) -> bool:
        """One faiss.knn over every row with faiss's own OpenMP team (it splits the queries between threads), below
        faiss's BLAS threshold, for

        - an index within ``team_bytes`` at B >= 2: there, T shards cost more in hand-offs and merges than they
          share (10k x 128, B = 16, 2 cores: 1.9-2.1 ms as two shards, 1.0-1.2 ms as one team search, the same
          faiss loop as faiss-flat's 1.1-1.3 ms), and one job in the caller's thread leaves a core idle (B = 2:
          0.15 ms as one job, 0.095 ms as a team at 10k; the team was ahead at B = 2-8 from 1k rows up);
        - a larger index at 2 <= B < small_batch: each thread streams the whole index for its queries, and the two
          streams share what they fetch; T shards streamed each shard once per query and lost 1.5-3x at 50k and 1M
          x 128, B = 2-8 (same-run ratios 0.35-0.66 against the team's 0.88-1.08).
        B = 1 stays on shards (or one job): a team of two with one query leaves a thread idle (team 0.185 ms, one
        job 0.093 ms at 10k; faiss-flat at B = 1 is 2-4x slower than two shards)."""
        if self._faiss is None or self.threads < 2 or b * self.x.shape[1] >= self._blas_from:
            return False
        return b >= 2 if self._team_index else 2 <= b < self.small_batch

    def _in_caller(self, run, *args, omp_threads=1):
        """run(*args) in the caller's thread, with faiss's OpenMP at omp_threads for it (thread-local, put back)."""
        if run not in (self._shard_faiss, self._faiss_topk):
            return run(*args)
        before = self._faiss.omp_get_max_threads()
        self._faiss.omp_set_num_threads(omp_threads)
        try:
            return run(*args)
        finally:
            self._faiss.omp_set_num_threads(before)

    def _shard_torch(self, q, a, b, k, exclude):
        blocks = [_shard_topk(q[i:i + self.QUERY_BLOCK], self.x, a, b, k,
                              None if exclude is None else exclude[i:i + self.QUERY_BLOCK],
                              self.chunk_elems, self.SLAB)
                  for i in range(0, q.shape[0], self.QUERY_BLOCK)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _team_bf16(self, q, k, exclude):
        """Top-k packed keys of every row, sorted, for an index within the LLC: ``_shard_bf16``'s bound with a
        selection that needs no heap, from TEAM_SLAB_FROM queries (fewer keep ``_shard_bf16``'s heap over all rows).

        Per chunk of queries (TEAM_CHUNK scores), one bfloat16 matmul scores every row; its columns are cut into
        SLAB strided slabs (rows j, j + M, j + 2M, ...), and the k-th best slab maximum is at most the k-th best
        score, so L = that less the rounding slack is a bound below which no row can make the top k. The slabs whose
        maximum reaches L, and in them the rows that reach L, are the candidates (~k + a few per query on random
        data), re-scored in float32 by faiss and ranked by packed keys. All of it reads the scores as int16: a
        bfloat16 >= 0 orders like its bits, so max and compare run as integer SIMD (a float conversion of the scores
        costs more than the matmul). Where L <= 0 (the bits of negative scores order backwards) or a query has more
        than TEAM_CAP + 4k candidates (many equal rows), the query is redone by ``_shard_bf16``'s heap. 10k x 128,
        B = 1024 on the 2-core EPYC: 9-16 ms against faiss-flat's 16-25 ms in the same runs, where the heap path
        took 23-30 ms against 19-22 ms.
        """
        faiss, n, d, b = self._faiss, self.x.shape[0], q.shape[1], q.shape[0]
        m = self._xb.shape[0] // self.SLAB
        if b < self.TEAM_SLAB_FROM or m < k:  # few queries, or fewer slabs than k (no k-th slab maximum): the heap
            return self._shard_bf16(q, 0, n, k, exclude)
        neg = torch.tensor(float("-inf"), dtype=torch.bfloat16).view(torch.int16)
        slack = _bf16_slack(q.norm(dim=1).double(), self._norm_max[(0, n)], d)
        qn = q.numpy()
        out, redo = [], []
        step = max(1, self.TEAM_CHUNK // self._xb.shape[0])
        for i in range(0, b, step):
            qq, bq = q[i:i + step], min(step, b - i)
            s = torch.mm(qq.bfloat16(), self._xb.t()).view(torch.int16)
            s[:, n:] = neg  # padding rows
            if exclude is not None:
                ex = exclude[i:i + step]
                r = torch.nonzero((ex >= 0) & (ex < n), as_tuple=True)[0]
                s[r, ex[r]] = neg
            slabs = s.view(bq, self.SLAB, m)
            top = slabs.amax(dim=1)  # the slab's max where >= 0 (else its min: negative either way)
            kth = torch.topk(top, k, dim=1, sorted=False).values.amin(dim=1).view(torch.bfloat16).double()
            low = kth - slack[i:i + bq]
            lb = low.clamp_min(0).bfloat16()
            lbits = lb.view(torch.int16) - (lb.double() > low).short()  # the largest bfloat16 <= L, as bits
            bad = ~(low > 0)  # also NaN
            lbits[bad] = torch.iinfo(torch.int16).max  # no candidates: redone below
            qi, si = torch.nonzero(top >= lbits[:, None], as_tuple=True)
            pi, ci = torch.nonzero(slabs.permute(0, 2, 1)[qi, si] >= lbits[qi, None], as_tuple=True)
            rq, rows = qi[pi], ci * m + si[pi]
            count = torch.bincount(rq, minlength=bq)
            bad |= count > self.TEAM_CAP + 4 * k
            keep = ~bad[rq]
            rq, rows = rq[keep], rows[keep]
            count = count.masked_fill(bad, 0)
            c = max(k, int(count.max()))
            ids = torch.full((bq, c), -1, dtype=torch.int64)
            ids[rq, torch.arange(rq.numel()) - (torch.cumsum(count, 0) - count)[rq]] = rows
            scores = np.empty((bq, c), np.float32)
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(scores), faiss.swig_ptr(qn[i:i + bq]),
                                             faiss.swig_ptr(self._x_np), faiss.swig_ptr(ids.numpy()), d, bq, c)
            keys = pack_keys(torch.from_numpy(scores), ids.clamp_min(0)).masked_fill_(ids < 0, KEY_MIN)
            out.append(_top_sorted(keys, k))
            redo.append(torch.nonzero(bad, as_tuple=True)[0] + i)
        keys, redo = torch.cat(out), torch.cat(redo)
        if redo.numel():
            keys[redo] = self._shard_bf16(q[redo], 0, n, k, None if exclude is None else exclude[redo])
        return keys

    def _shard_bf16(self, q, a, b, k, exclude):
        """Top-k packed keys of rows a:b: every row scored from the bfloat16 copy, then the rows that rounding cannot
        rule out re-scored exactly in float32.

        bfloat16 rounds q and x to 8 bits (relative 2^-9 each), their products are exact in float32, the float32
        sum adds at most d * 2^-24 of sum |q_i x_i|, and the bfloat16 result 2^-9 more: so
        |bf16 score - score| <= delta * |q| * |x| with delta = 3 * 2^-9 + 2 (d + 4) * 2^-23 (which also covers
        the reference's own float32 rounding). If L is the k-th best bfloat16 score less 2 * delta * |q| * max|x|,
        a row scoring below L in bfloat16 scores below k others in float32: only rows at or above L are re-scored.
        A faiss heap keeps the best k + BF16_SPARE per query; a query whose last kept score still reaches L may
        have more candidates and is redone by ``_shard_topk``. The index is read as 2 bytes a value, not 4: where
        B is small enough that reading it is the cost, this halves it.
        """
        faiss = self._faiss
        bq, rows, d = q.shape[0], b - a, q.shape[1]
        spare = min(rows, k + self.BF16_SPARE)
        vals, ids = np.empty((bq, spare), np.float32), np.empty((bq, spare), np.int64)
        heap = faiss.float_minheap_array_t()
        heap.nh, heap.k, heap.val, heap.ids = bq, spare, faiss.swig_ptr(vals), faiss.swig_ptr(ids)
        heap.heapify()
        qb = q.bfloat16()
        ex = None if exclude is None else exclude.numpy()
        step = max(1024, self.chunk_elems // bq)
        for s in range(a, b, step):
            c = min(step, b - s)
            scores = torch.mm(qb, self._xb[s:s + c].t()).float().numpy()
            if ex is not None:
                r = np.flatnonzero((ex >= s) & (ex < s + c))
                scores[r, ex[r] - s] = -np.inf
            heap.addn(c, faiss.swig_ptr(scores), s, 0, bq)
        heap.reorder()  # best first; unfilled slots hold id -1
        qn = q.numpy()
        low = vals[:, k - 1] - _bf16_slack(np.linalg.norm(qn, axis=1), self._norm_max[(a, b)], d)
        over = np.flatnonzero((vals[:, -1] >= low) & (ids[:, -1] >= 0) & (spare < rows))
        live = (vals >= low[:, None]) & (ids >= 0)
        r, c = np.nonzero(live)
        exact = np.full(vals.shape, -np.inf, dtype=np.float32)
        exact[r, c] = np.einsum("ij,ij->i", qn[r], self._x_np[ids[r, c]])
        keys = pack_keys(torch.from_numpy(exact), torch.from_numpy(ids)).masked_fill_(torch.from_numpy(~live), KEY_MIN)
        keys = _top_sorted(keys, k)
        if over.size:
            o = torch.from_numpy(over)
            keys[o] = _shard_topk(q[o], self.x, a, b, k, None if exclude is None else exclude[o], self.chunk_elems,
                                  self.SLAB)
        return keys

    def _shard_faiss(self, q, a, b, k, exclude):
        """Top-k packed keys of rows a:b by faiss.knn (see ``_faiss_topk``), for the merge of shards."""
        scores, ids = self._faiss_topk(q, a, b, k, exclude)
        keys = pack_keys(scores, ids)
        return keys if bool((ids >= 0).all()) else keys.masked_fill_(ids < 0, KEY_MIN)

    def _faiss_topk(self, q, a, b, k, exclude):
        """(scores, ids) [B, k] of rows a:b (k <= b - a) by faiss.knn, best first, ties to the lower id, ids global;
        (-inf, -1) at the end of a row where the rows less the excluded one hold fewer than k.

        faiss's answer is fixed up in numpy rather than by packing keys in torch: at 10k x 128, B = 16 the packing,
        exclusion and top-k in torch ops took ~0.2 ms around a 0.65 ms search. faiss is asked for k + 1 (+ 1 for the
        excluded row), best first: the excluded id moves to the end of its row as (-inf, -1); scores equal inside
        the top k are put in id order; a row whose k-th score equals the next one (a tie faiss may have broken
        against a lower id it did not return) is redone by ``_shard_topk``, whose packed-key selection breaks ties
        like the reference."""
        ask = min(b - a, k + 1 + (exclude is not None))
        scores, ids = self._faiss.knn(q.numpy(), self._x_np[a:b], ask, metric=self._faiss.METRIC_INNER_PRODUCT)
        if a:
            ids += a
        if exclude is not None:
            hit = ids == exclude.numpy()[:, None]  # at most one per row: faiss returns distinct rows
            has = hit.any(axis=1)
            if ask == k + 2:  # every row keeps k + 1: drop its excluded id, or its last where it has none
                hit[~has, -1] = True
                keep = ~hit
                scores, ids = scores[keep].reshape(-1, k + 1), ids[keep].reshape(-1, k + 1)
            elif has.any():  # a shard of at most k + 1 rows: move the excluded id to the end as (-inf, -1)
                j = np.arange(ask)
                cols = np.minimum(j + (j >= np.where(has, hit.argmax(axis=1), ask)[:, None]), ask - 1)
                scores, ids = np.take_along_axis(scores, cols, 1), np.take_along_axis(ids, cols, 1)
                scores[has, -1], ids[has, -1] = -np.inf, -1
        tied = np.zeros(0, dtype=np.int64)
        if ask > k:
            tied = np.flatnonzero((scores[:, k - 1] == scores[:, k]) & (ids[:, k] >= 0))
            scores, ids = scores[:, :k], ids[:, :k]
        if k > 1 and (scores[:, 1:] == scores[:, :-1]).any():  # equal scores inside the top k: lower id first
            order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        scores, ids = torch.from_numpy(np.ascontiguousarray(scores)), torch.from_numpy(np.ascontiguousarray(ids))
        if tied.size:
            r = torch.from_numpy(tied)
            keys = _shard_topk(q[r], self.x, a, b, k, None if exclude is None else exclude[r], self.chunk_elems,
                               self.SLAB)
            scores[r], ids[r] = unpack_keys(_top_sorted(keys, k))
        return scores, ids


def _bf16_slack(qnorm, xmax: float, d: int):
    """2 * delta * |q| * max|x| (+ flushed subnormals): no row whose bfloat16 score is that far below the k-th best
    bfloat16 score can make the float32 top k (the bound is derived in ``CPUExactSearch._shard_bf16``)."""
    delta = (3 * 2.0 ** -9 + 2 * (d + 4) * 2.0 ** -23) * (1 + 2.0 ** -10)  # (1 + 2^-10): |q| rounded in float32
    return 2 * (delta * qnorm * xmax + d * 2.0 ** -118 * (qnorm + xmax))


def _cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX; Linux /proc/cpuinfo): elsewhere torch
    converts and a bfloat16 matmul is slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs); 32 MiB where it cannot be read."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def _single_threaded_pool(n: int, faiss) -> ThreadPoolExecutor:
    """n worker threads whose torch, MKL and OpenMP (torch's and faiss's) run one thread each.

    torch.set_num_threads is thread-local for OpenMP and MKL, but it also stores a process-wide default that
    threads read on first use. Each worker sets 1 and initialises with it while the caller waits, then the
    caller's value is put back: the caller and threads started later keep their own settings.
    """
    caller = torch.get_num_threads()
    ready = threading.Barrier(n + 1)

    def init():
        torch.set_num_threads(1)
        torch.get_num_threads()  # initialise this thread's OpenMP state with 1 while the default is 1
        if faiss is not None:
            faiss.omp_set_num_threads(1)  # per-thread OpenMP ICV of faiss's own libgomp (and its OpenBLAS)

    pool = ThreadPoolExecutor(n, thread_name_prefix="exact-search", initializer=init)
    try:
        for _ in range(n):
            pool.submit(ready.wait, 60)
        ready.wait(60)
    finally:
        torch.set_num_threads(caller)
    return pool


def _shard_topk(q: torch.Tensor, x: torch.Tensor, a: int, b: int, k: int, exclude: torch.Tensor | None,
                chunk_elems: int, g: int) -> torch.Tensor:
    """Exact top-k packed keys [B, k] (unsorted) of q against rows a:b of x, ids global.

    Per chunk of C rows: S = q @ x_chunk^T (float32, C chosen so S is ~chunk_elems floats), then the max of each
    slab of g columns (columns j, j + W, ..., W = C / g) and a running k-th best score thr per query. A query
    none of whose slab maxima reaches thr gains nothing from this chunk (every score is below its k-th best); the
    others take their top-(mh + 1) slabs by max, mh = min(k, slabs reaching thr), and select among the mh * g
    scores of the first mh. That is exact unless the new k-th best is <= the (mh + 1)-th slab max (a tie at the
    boundary), and such rows fall back to the full packed-key top-k of their chunk row, which is the reference's
    selection. Past the first chunks most queries are untouched, so selection costs a few % of the matmul.
    """
    bq = q.shape[0]
    rows = b - a
    c_full = max(g * (k + 2) * 2, min(65536, chunk_elems // bq))
    c_full -= c_full % g
    w = c_full // g
    best = torch.full((bq, k), KEY_MIN, dtype=torch.int64)
    thr = torch.full((bq,), float("-inf"))
    slab_offsets = torch.arange(g, dtype=torch.int64) * w
    buf = torch.empty(bq, c_full) if rows >= c_full else None
    for s in range(a, b, c_full):
        c = min(c_full, b - s)
        xc = x[s:s + c]
        if xc.dtype != torch.float32:
            xc = xc.float()
        scores = torch.mm(q, xc.t(), out=buf if c == c_full else None)
        if exclude is not None:  # the reference's scatter of -inf at the excluded column
            inside = (exclude >= s) & (exclude < s + c)
            if bool(inside.any()):
                col = (exclude - s).clamp(0, c - 1)[:, None]
                scores.scatter_(1, col, torch.where(inside[:, None], float("-inf"), scores.gather(1, col)))
        if c < c_full:  # the tail chunk: plain packed-key selection
            keys = _masked(_chunk_topk(scores, min(k, c), s, exclude), exclude)
            best = _top_sorted(torch.cat([best, keys], dim=1), k)
            thr = _kth_score(best)
            continue
        slab_max = scores.view(bq, g, w).amax(dim=1)  # [B, W]
        reach = slab_max >= thr[:, None]
        n_reach = reach.sum(dim=1)
        touched = n_reach.nonzero().squeeze(1)
        r = touched.numel()
        if r == 0:
            continue
        every = r == bq
        mh = min(int(n_reach.max()), k)
        sub_max = slab_max if every else slab_max[touched]
        top_max, top_slab = sub_max.topk(min(mh + 1, w), dim=1)
        cols = (top_slab[:, :mh, None] + slab_offsets).reshape(r, mh * g)
        vals = scores.gather(1, cols) if every else scores[touched[:, None], cols]
        sub_ex = None if exclude is None else (exclude if every else exclude[touched])
        cand = _masked(pack_keys(vals, cols + s), sub_ex)
        sub_best = best if every else best[touched]
        new = torch.cat([sub_best, cand], dim=1).topk(k, dim=1).values
        new_thr = _kth_score(new)
        if mh < w:
            tied = new_thr <= top_max[:, mh]
            if bool(tied.any()):
                t = tied.nonzero().squeeze(1)
                row_scores = scores[touched[t]]
                t_ex = None if sub_ex is None else sub_ex[t]
                full = _masked(_chunk_topk(row_scores, k, s, t_ex), t_ex)
                new[t] = torch.cat([sub_best[t], full], dim=1).topk(k, dim=1).values
                new_thr = _kth_score(new)
        if every:
            best, thr = new, new_thr
        else:
            best[touched], thr[touched] = new, new_thr
    return best


def _masked(keys: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    if exclude is None:
        return keys
    ids = unpack_keys(keys)[1]
    return keys.masked_fill(ids == exclude[:, None], KEY_MIN)


# ------------------------------------------------------------------------------------------------------- torch


@dataclass(kw_only=True)
class TorchParams:
    dtype: str | None = None  # storage dtype: fp32 | bf16 | fp16 (None = the embeddings' own)
    chunk_rows: int = 1 << 20  # index rows per matmul: at most B x chunk_rows scores exist at once


class TorchBackend(Backend):
    """The search people write by hand, kept as the bench's baseline: ``(q @ x.T).topk(k)`` per chunk of rows,
    chunks merged, the excluded id's score set to -inf. Not a search path of ours (that is ``exact``)."""

    name = "torch"

    def __init__(self, embeddings, p: TorchParams):
        t0 = time.perf_counter()
        if p.dtype is not None and p.dtype not in DTYPES:
            raise ValueError(f"torch: dtype must be one of {sorted(DTYPES)}, got {p.dtype!r}")
        if p.chunk_rows < 1:
            raise ValueError(f"torch: chunk_rows must be >= 1, got {p.chunk_rows}")
        x = _as_tensor(embeddings, DTYPES.get(p.dtype))
        if x.dim() != 2:
            raise ValueError(f"embeddings must be [N, D], got {tuple(x.shape)}")
        super().__init__(x.shape[0], x.shape[1], x.dtype, dataclasses.asdict(p))
        self.x, self.chunk = x, p.chunk_rows
        self.build_s = time.perf_counter() - t0

    def search(self, queries, k, exclude=None):
        q = _as_tensor(queries).to(self.x.device, self.dtype)
        ex = _exclude_tensor(exclude, q.shape[0] if q.dim() == 2 else 0)
        _check_search(q.shape, self.d, self.n, k, ex)
        rows = torch.arange(q.shape[0], device=q.device)
        best_s = best_i = None
        for a in range(0, self.n, self.chunk):
            s = (q @ self.x[a:a + self.chunk].T).float()
            if ex is not None:
                local = ex.to(q.device) - a
                hit = (local >= 0) & (local < s.shape[1])
                s[rows[hit], local[hit]] = float("-inf")
            cs, ci = s.topk(min(k, s.shape[1]), dim=1)
            ci = ci + a
            if best_s is not None:
                cs, order = torch.cat([best_s, cs], 1).topk(min(k, best_s.shape[1] + cs.shape[1]), dim=1)
                ci = torch.cat([best_i, ci], 1).gather(1, order)
            best_s, best_i = cs, ci
        return best_s, best_i


# ------------------------------------------------------------------------------------------------------- faiss


@dataclass(kw_only=True)
class FaissFlatParams:
    gpu: bool | None = None  # None = GpuIndexFlatIP when faiss has GPU support and CUDA is available


class FaissFlatBackend(Backend):
    """faiss exact inner product, as faiss ships it (its own OpenMP threads): the baseline the bench compares to."""

    name = "faiss-flat"

    def __init__(self, embeddings, p: FaissFlatParams):
        t0 = time.perf_counter()
        faiss = _import_faiss()
        x = _as_float32_numpy(embeddings)
        super().__init__(x.shape[0], x.shape[1], torch.float32, dataclasses.asdict(p))
        can_gpu = hasattr(faiss, "GpuIndexFlatIP") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()
        if p.gpu and not can_gpu:
            raise RuntimeError("faiss-flat: gpu=True needs faiss-gpu and a CUDA device")
        self.gpu = can_gpu if p.gpu is None else p.gpu
        self.params["gpu"] = self.gpu
        if self.gpu:
            self._res = faiss.StandardGpuResources()
            self.index = faiss.GpuIndexFlatIP(self._res, self.d)
        else:
            self.index = faiss.IndexFlatIP(self.d)
        self.index.add(x)
        self.build_s = time.perf_counter() - t0

    def search(self, queries, k, exclude=None):
        q, ex, ask = self._faiss_query(queries, k, exclude)
        scores, ids = self.index.search(q, ask)
        return unpack_keys(_top_sorted(_keys_from(scores, ids, ex), k))


@dataclass(kw_only=True)
class IVFPQParams:
    nlist: int | None = None  # inverted lists; None = 2 * sqrt(N), at most N / 39 (faiss wants 39 points a list)
    m: int | None = None  # PQ sub-quantizers; None = the largest divisor of D that is <= D / 4 (4 dims each)
    nbits: int | None = None  # bits per sub-quantizer code; None = 8, fewer when the training sample is small
    nprobe: int | None = None  # lists scanned per query; None = nlist / 32, at least 1
    k_factor: int = 8  # IndexRefineFlat re-ranks k * k_factor IVF-PQ candidates with exact inner products
    # (k_factor 4 -> 8 took recall@8 from 0.96 to 0.997 on 50k clustered x 128, m=32)
    train_size: int | None = None  # training sample; None = min(N, max(39 * nlist, 39 * 256))
    seed: int = 0


class FaissIVFPQBackend(Backend):
    """IVF-PQ with an exact re-rank. Rows where the probed lists hold fewer than k (+ 1 excluded) vectors are
    answered by the refine stage's flat index instead, so k results always come back."""

    name = "faiss-ivfpq"

    def __init__(self, embeddings, p: IVFPQParams):
        t0 = time.perf_counter()
        faiss = _import_faiss()
        x = _as_float32_numpy(embeddings)
        n, d = x.shape
        super().__init__(n, d, torch.float32, {})
        nlist = p.nlist or max(1, min(int(round(2 * math.sqrt(n))), n // 39))
        m = p.m or max(s for s in range(1, d + 1) if d % s == 0 and s <= max(1, d // 4))
        if d % m:
            raise ValueError(f"faiss-ivfpq: m={m} must divide D={d}")
        n_train = min(n, p.train_size or max(39 * nlist, 39 * 256))
        nbits = p.nbits or max(1, min(8, int(math.log2(max(2, n_train // 39)))))
        nprobe = p.nprobe or max(1, nlist // 32)
        if nlist > n_train:
            raise ValueError(f"faiss-ivfpq: nlist={nlist} lists need at least as many training vectors, got {n_train}")
        rng = np.random.default_rng(p.seed)
        sample = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = p.seed
        ivf.pq.cp.seed = p.seed
        # PQ training (m k-means in D/m dims, which BLAS runs at ~2 GFLOP/s) is most of the build: 6.7 s on one core
        # for 10k x 128, m=32 with faiss's 25 iterations. 10 iterations (the coarse quantizer's default) on at most
        # 39 points per code (faiss's minimum) cost ~2.7 s; after the flat re-rank the recall does not notice.
        ivf.pq.cp.niter = 10
        ivf.pq.cp.max_points_per_centroid = 39
        index = faiss.IndexRefineFlat(ivf)  # before add: the refine stage keeps its own copy of every vector
        index.train(sample)
        index.add(x)
        self._keep = (quantizer, ivf)  # the Python wrappers own the C++ objects the refine index points to
        self.index, self.ivf = index, ivf
        self.params = {"nlist": nlist, "m": m, "nbits": nbits, "train_size": n_train, "seed": p.seed}
        self.set_search_params(nprobe=nprobe, k_factor=p.k_factor)
        self.build_s = time.perf_counter() - t0

    def set_search_params(self, nprobe: int | None = None, k_factor: int | None = None) -> None:
        if nprobe is not None:
            self.ivf.nprobe = min(int(nprobe), self.params["nlist"])
            self.params["nprobe"] = self.ivf.nprobe
        if k_factor is not None:
            self.index.k_factor = float(k_factor)
            self.params["k_factor"] = int(k_factor)

    def search(self, queries, k, exclude=None):
        q, ex, ask = self._faiss_query(queries, k, exclude)
        scores, ids = self.index.search(q, ask)
        keys = _top_sorted(_keys_from(scores, ids, ex), k)
        short = (keys == KEY_MIN).any(dim=1)
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            s2, i2 = self.index.refine_index.search(q[rows.numpy()], ask)
            keys[rows] = _top_sorted(_keys_from(s2, i2, None if ex is None else ex[rows]), k)
        return unpack_keys(keys)

    def index_bytes(self):
        """Codes + ids in the lists, the centroids, and the refine stage's float32 copy of every vector."""
        return self.n * (self.ivf.code_size + 8) + self.params["nlist"] * self.d * 4 + self.n * self.d * 4

    def bytes_per_query(self, b, k):
        """Centroids once per batch, the probed lists' codes and ids, and the re-ranked vectors."""
        code = self.ivf.code_size + 8  # PQ code + int64 id
        scanned = self.ivf.nprobe * self.n / self.params["nlist"] * self.ivf.invlists.imbalance_factor()
        refine = min(self.n, k * self.index.k_factor) * self.d * 4
        return self.params["nlist"] * self.d * 4 / b + scanned * code + refine + self.d * 4


# ----------------------------------------------------------------------------------------------------- registry

BACKENDS = {
    "exact": (ExactBackend, ExactParams),
    "torch": (TorchBackend, TorchParams),
    "faiss-flat": (FaissFlatBackend, FaissFlatParams),
    "faiss-ivfpq": (FaissIVFPQBackend, IVFPQParams),
}
ANN_BACKENDS = ("faiss-ivfpq",)


def build_backend(name: str, embeddings, **params) -> Backend:
    """A backend over ``embeddings`` [N, D] (numpy or torch; float32, or bf16/fp16 for ``exact`` on request).

    ``params`` are the fields of the backend's params dataclass (ExactParams, FaissFlatParams, IVFPQParams);
    an unknown name or parameter is a ValueError naming it.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    cls, params_cls = BACKENDS[name]
    fields = {f.name for f in dataclasses.fields(params_cls)}
    for key in params:
        if key not in fields:
            raise ValueError(f"{name}: unknown parameter {key!r} (known: {', '.join(sorted(fields))})")
    return cls(embeddings, params_cls(**params))


def write_faiss(backend: Backend, path) -> None:
    """A faiss backend's index to ``path`` (faiss.write_index; a GPU index is copied to the CPU first)."""
    faiss = _import_faiss()
    index = backend.index
    if getattr(backend, "gpu", False):
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(path))


def read_faiss(name: str, path, nprobe: int | None = None, k_factor: int | None = None) -> Backend:
    """The backend ``name`` around an index ``write_faiss`` wrote, without rebuilding (an IVF-PQ build trains
    k-means); ``nprobe`` / ``k_factor`` override the saved search parameters of faiss-ivfpq."""
    faiss = _import_faiss()
    index = faiss.read_index(str(path))
    if name == "faiss-flat":
        backend = FaissFlatBackend.__new__(FaissFlatBackend)
        Backend.__init__(backend, index.ntotal, index.d, torch.float32, {"gpu": False})
        backend.gpu, backend.index = False, index
        return backend
    if name != "faiss-ivfpq":
        raise ValueError(f"{path}: no faiss file for backend {name!r}")
    backend = FaissIVFPQBackend.__new__(FaissIVFPQBackend)
    Backend.__init__(backend, index.ntotal, index.d, torch.float32, {})
    ivf = faiss.downcast_index(index.base_index)
    backend.index, backend.ivf, backend._keep = index, ivf, (index,)
    backend.params = {"nlist": ivf.nlist, "m": ivf.pq.M, "nbits": ivf.pq.nbits, "nprobe": ivf.nprobe,
                      "k_factor": int(index.k_factor)}
    backend.set_search_params(nprobe=nprobe, k_factor=k_factor)
    return backend


def recall_at_k(ids, queries, embeddings, exact_scores, tol: float = 1e-5) -> float:
    """Tie-tolerant recall@k, as in faiss's benchs: a returned id counts when its true score reaches the exact
    k-th score (less tol, relative to that score's magnitude when it exceeds 1), so an equally good neighbour is not
    a miss; an id returned twice counts once. exact_scores [B, k] come from an exact fp32 search; the returned
    ids' true scores are recomputed in float64 from ``embeddings`` (numpy, memory-mapped or torch)."""
    ids = _as_tensor(ids).cpu().long()
    b, k = ids.shape
    flat = ids.clamp_min(0).reshape(-1)
    if isinstance(embeddings, torch.Tensor):
        rows = embeddings.detach()[flat.to(embeddings.device)].cpu().double()
    else:
        rows = torch.from_numpy(np.asarray(embeddings)[flat.numpy()].astype(np.float64))
    true = torch.einsum("bd,bkd->bk", _as_tensor(queries).cpu().double(), rows.reshape(b, k, -1))
    kth = _as_tensor(exact_scores).cpu().double()[:, -1:]
    ok = (true >= kth - tol * kth.abs().clamp_min(1.0)) & (ids >= 0)
    sorted_ids, order = ids.sort(dim=1)
    ok = ok.gather(1, order)
    ok[:, 1:] &= sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return float(ok.sum()) / (b * k)
