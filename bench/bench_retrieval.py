"""Retrieval throughput harness: backend x B x N x D x dtype, recall and latency side by side.

    realm-hpc bench retrieval --quick                       # CPU, < 1 min: N=50k, D=128, all backends
    realm-hpc bench retrieval --n 1000000 --batch-sizes 1 64 1024 --backends exact faiss-flat
    realm-hpc bench retrieval --index runs/demo/index       # a saved index instead of synthetic vectors
    python bench/bench_retrieval.py --quick                 # the same (the flags live in realm_hpc/cli.py)

Data: seeded synthetic clustered unit vectors, or a saved index's embeddings. Queries are perturbed copies of
indexed rows, each excluding its source row (REALM's trivial-retrieval exclusion), so every backend's exclusion
path is what is timed. Ground truth: the exact fp32 search of the same queries.

Per cell: p20/p50/p80 latency of one search call of B queries (CPU: rounds interleaved across the cell's methods,
see bench.utils.time_interleaved), QPS = B / p50, tie-tolerant recall@k (over the whole query pool, >= 256
queries), bytes that must be read per query (Backend.bytes_per_query: the index once per batch for flat search;
centroids, probed codes + ids and re-ranked vectors for IVF-PQ) and the achieved GB/s, that as a fraction of a large
copy's bandwidth measured in the same run ((read + write) / time, so a read-only stream can exceed 1), peak memory as
RSS growth during one search call and during the build (VmHWM delta, see bench.utils.PeakRSS; not tracemalloc,
which misses torch's and faiss's allocations; on GPU also torch's peak allocation), index_mb (what the index
structures hold: a model, not a measurement), build time, and the speedup over faiss-flat and over torch matmul+topk (p50 ratios, same N, D, B, dtype).
Writes results.json, results.csv (machine, device, versions, git sha and time on every row), qps_vs_b.png,
recall_vs_qps.png, and prints one Markdown table. Not a test: no asserts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import utils  # noqa: E402  (after the sys.path insert: this file also runs as a script)
from bench.utils import PeakRSS, copy_bandwidth_gbs, pyplot, run_meta, save_figure, time_interleaved  # noqa: E402
from realm_hpc.retrieval.backends import ANN_BACKENDS, BACKENDS, DTYPES, build_backend, recall_at_k  # noqa: E402

BASELINE = "faiss-flat"


@dataclass(kw_only=True)
class RetrievalBench:
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64, 256, 1024])
    n: list[int] = field(default_factory=lambda: [1_000_000])
    dim: list[int] = field(default_factory=lambda: [128])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    k: int = 8
    nprobe: list[int] = field(default_factory=lambda: [4, 16, 64])  # IVF-PQ settings: the recall-vs-QPS curve
    ivfpq: dict = field(default_factory=dict)  # build params for faiss-ivfpq (nlist, m, nbits, k_factor, ...)
    recall_queries: int = 256  # recall is measured over max(this, max B) queries, once per backend setting
    index: str = ""  # a saved index directory (realm-hpc build-index) instead of synthetic data
    clusters: int | None = None  # synthetic: None = sqrt(N)
    min_repeats: int = 5
    max_repeats: int = 1000  # short cells fill min_time_s: 50 rounds of a 1 ms search left p50 ratios +-15 %
    min_time_s: float = 1.0  # per cell, on CPU
    seed: int = 0
    device: str = "auto"
    out: str = "runs/bench/retrieval"


def quick() -> RetrievalBench:
    """< 1 minute on a 2-core CPU: 50k x 128, B in {1, 16, 256}, two IVF-PQ settings."""
    return RetrievalBench(n=[50_000], batch_sizes=[1, 16, 256], nprobe=[4, 16], min_repeats=3, max_repeats=20,
                          min_time_s=0.2)


def config(quick_run: bool = False, **overrides) -> RetrievalBench:
    """The quick or full grid with the given fields replaced (None = keep); an unknown field is a ValueError."""
    cfg = quick() if quick_run else RetrievalBench()
    names = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides:
        if key not in names:
            raise ValueError(f"bench retrieval: unknown setting {key!r}")
    if overrides.get("index") and (overrides.get("n") or overrides.get("dim")):
        raise ValueError("bench retrieval: --index takes N and D from the index; drop --n / --dim")
    cfg = dataclasses.replace(cfg, **{key: v for key, v in overrides.items() if v is not None})
    for name in cfg.backends:
        if name not in BACKENDS:
            raise ValueError(f"bench retrieval: unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    for name in cfg.dtypes:
        if name not in DTYPES:
            raise ValueError(f"bench retrieval: unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    if min(cfg.batch_sizes) < 1 or cfg.k < 1:
        raise ValueError("bench retrieval: batch sizes and k must be positive")
    return cfg


# ------------------------------------------------------------------------------------------------------------ data

def synthetic(n: int, d: int, seed: int, clusters: int | None = None) -> torch.Tensor:
    """Unit vectors around sqrt(N) random centres (seeded), built in 1M-row chunks so 13M x 128 stays one copy."""
    gen = torch.Generator().manual_seed(seed)
    c = clusters or max(1, int(math.sqrt(n)))
    centres = torch.nn.functional.normalize(torch.randn(c, d, generator=gen), dim=1)
    x = torch.empty(n, d)
    for a in range(0, n, 1 << 20):
        b = min(n, a + (1 << 20))
        assign = torch.randint(c, (b - a,), generator=gen)
        noise = torch.randn(b - a, d, generator=gen) * (0.7 / math.sqrt(d))
        x[a:b] = torch.nn.functional.normalize(centres[assign] + noise, dim=1)
    return x


def load_index(path: str) -> torch.Tensor:
    from realm_hpc.retrieval.store import SavedIndex

    emb = SavedIndex.open(path).embeddings()  # checksum-verified, memory-mapped, in its stored dtype
    return emb.to(torch.float32, copy=True)  # searched from RAM, like the synthetic data


def make_queries(x: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbed copies of random indexed rows and their source ids (to exclude)."""
    gen = torch.Generator().manual_seed(seed + 1)
    src = torch.randint(x.shape[0], (count,), generator=gen)
    noise = torch.randn(count, x.shape[1], generator=gen) * (0.3 / math.sqrt(x.shape[1]))
    return torch.nn.functional.normalize(x[src] + noise, dim=1), src


# ------------------------------------------------------------------------------------------------------------- run

def run(cfg: RetrievalBench) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    meta = run_meta(device)
    meta["copy_gbs"] = copy_bandwidth_gbs(device, 5, 1 << 30 if device.type == "cuda" else 1 << 28)
    meta["config"] = dataclasses.asdict(cfg)
    with PeakRSS() as probe:
        pass
    meta["peak_memory"] = probe.method
    print(f"{meta['device']}  sha {meta['git_sha']}  copy bandwidth {meta['copy_gbs']:.1f} GB/s", flush=True)

    rows, skipped = [], []
    shapes = [("index", None)] if cfg.index else [(n, d) for n in cfg.n for d in cfg.dim]
    for n, d in shapes:
        x = load_index(cfg.index) if cfg.index else synthetic(n, d, cfg.seed, cfg.clusters)
        n, d = x.shape
        queries, exclude = make_queries(x, max(*cfg.batch_sizes, cfg.recall_queries), cfg.seed)
        queries, exclude = queries.to(device), exclude.to(device)
        truth = build_backend("exact", x.to(device)).search(queries, cfg.k, exclude)[0].cpu()
        for dname in cfg.dtypes:
            built = {}
            for name in cfg.backends:
                if name not in ("exact", "torch") and dname != "fp32":
                    skipped.append(dict(backend=name, dtype=dname, N=n, D=d, reason="stores float32 only"))
                    continue
                built[name] = _build(name, x, dname, device, cfg)
            recalls = _recalls(built, queries, exclude, x, truth, cfg)
            for b in cfg.batch_sizes:
                rows += _cell(built, queries[:b], exclude[:b], recalls, cfg, meta,
                              dict(dtype=dname, N=n, D=d, B=b, k=cfg.k), device)
                # progress on stderr: stdout carries one table
                print(markdown(rows[-sum(len(_settings(nm, cfg)) for nm in built):], header=False), file=sys.stderr,
                      flush=True)
            del built
        del x
    meta["wall_s"] = time.perf_counter() - t_start
    result = dict(meta=meta, rows=rows, skipped=skipped)
    write_outputs(result, out)
    print("\n" + markdown(rows))
    print(f"\nwrote {out}/results.json, results.csv, qps_vs_b.png, recall_vs_qps.png in {meta['wall_s']:.1f} s")
    return result


def _build(name, x, dname, device, cfg):
    params = {"exact": {"dtype": dname}, "torch": {"dtype": dname}, "faiss-ivfpq": dict(cfg.ivfpq)}.get(name, {})
    with PeakRSS() as mem:
        backend = build_backend(name, x.to(device) if name == "exact" else x, **params)
    backend.build_peak_mb = mem.mb
    return backend


def _settings(name: str, cfg: RetrievalBench) -> list[dict]:
    return [{"nprobe": p} for p in cfg.nprobe] if name in ANN_BACKENDS else [{}]


def _label(name: str, setting: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in setting.items())


def _recalls(built, queries, exclude, x, truth, cfg) -> dict[str, float]:
    """Recall of each backend and setting over the whole query pool (a batch of 1 would be a coin toss)."""
    out = {}
    for name, backend in built.items():
        for setting in _settings(name, cfg):
            if setting:
                backend.set_search_params(**setting)
            ids = torch.cat([backend.search(queries[a:a + 1024], cfg.k, exclude[a:a + 1024])[1].cpu()
                             for a in range(0, queries.shape[0], 1024)])
            out[_label(name, setting)] = recall_at_k(ids, queries.cpu().float(), x, truth)
    return out


def _cell(built, q, ex, recalls, cfg, meta, key, device) -> list[dict]:
    """One (dtype, N, D, B): every backend and setting timed in the same interleaved rounds."""
    fns, labels = {}, {}
    for name, backend in built.items():
        for setting in _settings(name, cfg):
            label = _label(name, setting)

            def search(backend=backend, setting=setting):
                if setting:
                    backend.set_search_params(**setting)
                return backend.search(q, cfg.k, ex)

            fns[label], labels[label] = search, (name, backend, setting)
    times = time_interleaved(fns, device, cfg.min_repeats, cfg.max_repeats, cfg.min_time_s)
    rows = []
    for label, fn in fns.items():
        name, backend, setting = labels[label]
        rss_mb, gpu_mb = _peak_memory(fn, device)
        p20, p50, p80 = times[label]
        qps = key["B"] / (p50 * 1e-3)
        bpq = backend.bytes_per_query(key["B"], cfg.k)
        gbs = bpq * qps / 1e9
        rows.append(dict(
            backend=name, setting=label[len(name):].strip(), **key, p20_ms=p20, p50_ms=p50, p80_ms=p80, qps=qps,
            recall=recalls[label], bytes_per_query=bpq, gbs=gbs,
            frac_bw=gbs / meta["copy_gbs"], search_peak_mb=rss_mb, gpu_peak_mb=gpu_mb, build_s=backend.build_s,
            build_peak_mb=backend.build_peak_mb, index_mb=backend.index_bytes() / 2**20,
            params=json.dumps(backend.describe(), sort_keys=True)))
    base = [r for r in rows if r["backend"] == BASELINE and r["dtype"] == "fp32"]
    naive = [r for r in rows if r["backend"] == "torch"]  # matmul + topk, same dtype as the cell
    for r in rows:
        r[f"speedup_vs_{BASELINE}"] = base[0]["p50_ms"] / r["p50_ms"] if base else None
        r["speedup_vs_torch"] = naive[0]["p50_ms"] / r["p50_ms"] if naive else None
    return rows


def _peak_memory(fn, device) -> tuple[float | None, float | None]:
    """(host RSS growth, GPU memory growth) in MB over one call; the GPU figure counts torch's allocator only
    (faiss-gpu allocates on its own)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        gpu_base = torch.cuda.memory_allocated(device)
    with PeakRSS() as mem:
        fn()
    if device.type != "cuda":
        return mem.mb, None
    torch.cuda.synchronize()
    return mem.mb, (torch.cuda.max_memory_allocated(device) - gpu_base) / 2**20


# ---------------------------------------------------------------------------------------------------------- output

COLUMNS = [("backend", "{}"), ("setting", "{}"), ("dtype", "{}"), ("N", "{:,}"), ("D", "{}"), ("B", "{}"),
           ("p50_ms", "{:.3f}"), ("p20_ms", "{:.3f}"), ("p80_ms", "{:.3f}"), ("qps", "{:,.0f}"), ("recall", "{:.4f}"),
           ("bytes_per_query", "{:,.0f}"), ("gbs", "{:.2f}"), ("frac_bw", "{:.3f}"), ("search_peak_mb", "{:.1f}"),
           ("index_mb", "{:.1f}"), ("build_s", "{:.2f}"), (f"speedup_vs_{BASELINE}", "{:.2f}"),
           ("speedup_vs_torch", "{:.2f}")]


def markdown(rows: list[dict], header: bool = True) -> str:
    return utils.markdown(rows, COLUMNS, header)


def write_outputs(result: dict, out: Path) -> None:
    utils.write_results(out, result, COLUMNS, stamp_keys=("copy_gbs", "peak_memory"))
    plot_qps(result["rows"], out / "qps_vs_b.png")
    plot_recall(result["rows"], out / "recall_vs_qps.png")


def _series(rows, key):
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return sorted(groups.items(), key=lambda kv: str(kv[0]))


def plot_qps(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, setting, dtype, n, d), pts in _series(rows, lambda r: (r["backend"], r["setting"], r["dtype"], r["N"],
                                                                      r["D"])):
        pts = sorted(pts, key=lambda r: r["B"])
        label = f"{name} {setting} {dtype} N={n:,} D={d}".replace("  ", " ")
        ax.plot([r["B"] for r in pts], [r["qps"] for r in pts], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="queries per call (B)", ylabel="queries / s", title="QPS vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_recall(rows: list[dict], path: Path) -> None:
    """Each ANN curve runs over its settings (nprobe) at one (B, N, D); exact backends are single points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, b, n, d, dtype), pts in _series(rows, lambda r: (r["backend"], r["B"], r["N"], r["D"], r["dtype"])):
        pts = sorted(pts, key=lambda r: r["qps"])
        ann = name in ANN_BACKENDS
        ax.plot([r["qps"] for r in pts], [r["recall"] for r in pts], marker="o" if ann else "x",
                linestyle="-" if ann else "none", label=f"{name} {dtype} B={b} N={n:,} D={d}")
        if ann:
            for r in pts:
                ax.annotate(r["setting"], (r["qps"], r["recall"]), fontsize=6)
    ax.set(xscale="log", xlabel="queries / s", ylabel=f"recall@{rows[0]['k'] if rows else 'k'} (tie-tolerant)",
           title="recall vs QPS")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> None:
    from realm_hpc.cli import main as cli_main

    cli_main(["bench", "retrieval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
