"""Benchmark kernels.ip_topk and kernels.marginal_logsumexp against baselines measured in the same run.

ip_topk (exact top-k, D=128) vs a plain torch matmul + topk (chunked over N so it fits) and faiss IndexFlatIP
(on a GPU only GpuIndexFlatIP, when faiss has it: a CPU faiss is no baseline for a GPU search), over B in
{1, 8, 64, 512, 4096} and k in --k; marginal_logsumexp forward + backward vs the naive torch formula. Reports
p20/p50/p80 ms, QPS, achieved GB/s (bytes that must be read or written once), recall@k against our exact result,
and speedup = baseline p50 / ours p50; the device's copy bandwidth is measured in the same run as the roofline to
read GB/s against. Writes bench_kernels.json (rewritten after every cell, "complete": false until the end, so a
run cut short keeps its rows; "skipped" lists baselines that could not run and why), appends bench_kernels.csv
(device, git sha, time on every row) and plots QPS vs B to bench_kernels_qps.png (where matplotlib is installed).

    python bench/bench_kernels.py --quick --out runs/bench        # CPU: torch + faiss, < 1 min
    REALM_HPC_KERNELS=triton python bench/bench_kernels.py ...    # CPU: add the Triton kernel (interpreter; slow)
    python bench/bench_kernels.py --n 1000000 13350000 --out ...  # GPU
    python bench/bench_kernels.py --n 13350000 --dtypes bf16 --b 1 64 512 4096 --k 8 64 --benches ip_topk

Timing: triton.testing.do_bench quantiles on GPU; time.perf_counter repeats on CPU. Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.utils import (  # noqa: E402  (after the sys.path insert: this file also runs as a script)
    copy_bandwidth_gbs, device_name, git_sha, pyplot, quantiles_ms, save_figure, versions, write_atomic)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BENCHES = ("ip_topk", "marginal")


# ---------------------------------------------------------------------------------------------- ip_topk methods

def torch_mm_topk(q: torch.Tensor, x: torch.Tensor, k: int, max_elems: int):
    """The obvious baseline: matmul + topk, chunked over N so the score block stays under max_elems."""
    chunk = max(k, max_elems // q.shape[0])
    best_s = best_i = None
    for start in range(0, x.shape[0], chunk):
        s, i = (q @ x[start:start + chunk].T).float().topk(min(k, x.shape[0] - start), dim=1)
        i += start
        if best_s is not None:
            s, j = torch.cat([best_s, s], 1).topk(k, dim=1)
            i = torch.cat([best_i, i], 1).gather(1, j)
        best_s, best_i = s, i
    return best_s, best_i


class FaissFlat:
    """faiss exact inner-product search; GpuIndexFlatIP when the GPU build is installed. Stores float32."""

    def __init__(self, x: torch.Tensor):
        import faiss

        self.faiss = faiss
        xf = x.float()
        d = x.shape[1]
        self.gpu = x.is_cuda and hasattr(faiss, "GpuIndexFlatIP") and faiss.get_num_gpus() > 0
        if self.gpu:
            import faiss.contrib.torch_utils  # noqa: F401  (lets search take/return torch CUDA tensors)

            self.res = faiss.StandardGpuResources()
            self.index = faiss.GpuIndexFlatIP(self.res, d)
            self.index.add(xf)
        else:
            self.index = faiss.IndexFlatIP(d)
            self.index.add(np.ascontiguousarray(xf.cpu().numpy()))
        self.name = "faiss_gpu_flat_ip" if self.gpu else "faiss_flat_ip"

    def __call__(self, q: torch.Tensor, k: int):
        if self.gpu:
            return self.index.search(q.float(), k)
        s, i = self.index.search(np.ascontiguousarray(q.float().cpu().numpy()), k)
        return torch.from_numpy(s), torch.from_numpy(i)


def recall(ids: torch.Tensor, exact: torch.Tensor) -> float:
    ids, exact = ids.cpu().long(), exact.cpu().long()
    hits = (ids[:, :, None] == exact[:, None, :]).any(-1).float().sum()
    return float(hits / exact.numel())


def faiss_baseline(x32: torch.Tensor, no_faiss: bool) -> tuple[FaissFlat | None, str | None]:
    """(the faiss index, None) or (None, why it is skipped)."""
    if no_faiss:
        return None, "--no-faiss"
    try:
        import faiss
    except Exception as exc:  # ImportError, or a broken install (a numpy ABI mismatch raises others)
        return None, f"faiss not importable ({type(exc).__name__}: {exc})"
    if x32.is_cuda and not (hasattr(faiss, "GpuIndexFlatIP") and faiss.get_num_gpus() > 0):
        return None, "faiss has no GPU here (faiss-gpu not installed): a CPU IndexFlatIP is no GPU baseline"
    return FaissFlat(x32), None


def bench_ip_topk(args, device, use_triton: bool, copy_gbs: float, result: dict, save) -> None:
    """Appends rows per (N, dtype, B, k) x method to result["rows"] (and to result["skipped"] a baseline that
    cannot run); ``save()`` after every cell."""
    import kernels

    rows, skipped = result["rows"], result["skipped"]
    # Generated on the device: 13.35M x 128 fp32 is 6.8 GB, slow to draw on a CPU and to copy over.
    gen = torch.Generator(device=device).manual_seed(0)
    for n in args.n:
        x32 = torch.randn(n, args.d, generator=gen, device=device)
        x32 /= x32.norm(dim=1, keepdim=True)
        faiss_index, why = faiss_baseline(x32, args.no_faiss)
        if why is not None:
            print(f"faiss baseline skipped: {why}", file=sys.stderr, flush=True)
            skipped.append(dict(bench="ip_topk", method="faiss", N=n, why=why))
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            x = x32.to(dtype)
            esize = x.element_size()
            for b in args.b:
                q = torch.randn(b, args.d, generator=gen, device=device).to(dtype)
                for k in args.k:
                    backend = "triton" if use_triton else "torch"
                    os.environ["REALM_HPC_KERNELS"] = backend
                    ours_name = f"kernels.ip_topk[{backend}]"
                    exact_ids = kernels.ip_topk(q, x, k)[1]
                    methods = {ours_name: lambda k=k: kernels.ip_topk(q, x, k)}
                    methods["torch_mm_topk"] = lambda k=k: torch_mm_topk(q, x, k, args.max_score_elems)
                    if faiss_index is not None:
                        methods[faiss_index.name] = lambda k=k: faiss_index(q, k)
                    nbytes = n * args.d * esize + b * args.d * esize + b * k * 12
                    measured = {}
                    for name, fn in methods.items():
                        p = quantiles_ms(fn, device, args.repeats)
                        measured[name] = p
                        rows.append(dict(
                            bench="ip_topk", method=name,
                            dtype=dname + ("(as fp32)" if name.startswith("faiss") else ""),
                            B=b, N=n, D=args.d, k=k, p20_ms=p[0], p50_ms=p[1], p80_ms=p[2],
                            qps=b / (p[1] * 1e-3), gbs=nbytes / (p[1] * 1e-3) / 1e9,
                            frac_copy_bw=nbytes / (p[1] * 1e-3) / 1e9 / copy_gbs,
                            recall=recall(fn()[1], exact_ids)))
                    for row in rows[-len(methods):]:
                        row["speedup_vs_" + "torch_mm_topk"] = measured["torch_mm_topk"][1] / row["p50_ms"]
                        if faiss_index is not None:
                            row["speedup_vs_" + "faiss"] = measured[faiss_index.name][1] / row["p50_ms"]
                    print(_fmt(rows[-len(methods):]), flush=True)
                    save()
        del x32, faiss_index


# ---------------------------------------------------------------------------------- marginal_logsumexp methods

def naive_marginal(r, l):
    r, l = r.float(), l.float()
    return torch.logsumexp(r + l, -1) - torch.logsumexp(r, -1)


def bench_marginal(args, device, use_triton: bool, copy_gbs: float, result: dict, save) -> None:
    import kernels

    rows = result["rows"]
    backend = "triton" if use_triton else "torch"
    os.environ["REALM_HPC_KERNELS"] = backend
    for b in args.mlse_b:
        for kdocs in args.mlse_k:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                r = torch.randn(b, kdocs, device=device).to(dtype).requires_grad_()
                l = (-torch.rand(b, kdocs, device=device) * 5).to(dtype).requires_grad_()

                def fwd_bwd(fn):
                    r.grad = l.grad = None
                    fn(r, l).sum().backward()

                methods = {f"kernels.marginal_logsumexp[{backend}]": lambda: fwd_bwd(kernels.marginal_logsumexp),
                           "torch_naive": lambda: fwd_bwd(naive_marginal)}
                nbytes = 4 * b * kdocs * r.element_size()  # read r, l (twice: fwd, bwd), write dr, dl: >= 4 passes
                measured = {}
                for name, fn in methods.items():
                    p = quantiles_ms(fn, device, args.repeats)
                    measured[name] = p
                    rows.append(dict(bench="marginal_logsumexp", method=name, dtype=dname, B=b, N=kdocs, D=None,
                                     k=None, p20_ms=p[0], p50_ms=p[1], p80_ms=p[2], qps=b / (p[1] * 1e-3),
                                     gbs=nbytes / (p[1] * 1e-3) / 1e9,
                                     frac_copy_bw=nbytes / (p[1] * 1e-3) / 1e9 / copy_gbs, recall=None))
                for row in rows[-2:]:
                    row["speedup_vs_torch_naive"] = measured["torch_naive"][1] / row["p50_ms"]
                print(_fmt(rows[-2:]), flush=True)
                save()


# ------------------------------------------------------------------------------------------------------ output

def _fmt(rows: list[dict]) -> str:
    out = []
    for r in rows:
        sp = " ".join(f"{k[11:]}={v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
        rec = "" if r.get("recall") is None else f" recall={r['recall']:.3f}"
        out.append(f"{r['bench']:<18} {r['method']:<34} {r['dtype']:<10} B={r['B']:<5} N={r['N']:<9} "
                   f"p50={r['p50_ms']:9.3f}ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] qps={r['qps']:12.1f} "
                   f"GB/s={r['gbs']:7.2f}{rec} {sp}")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> bool:
    """QPS vs B per (method, dtype, N, k); False (nothing written) without ip_topk rows or without matplotlib,
    which only draws this output (the GPU image may lack it)."""
    topk = [r for r in rows if r["bench"] == "ip_topk"]
    if not topk:
        return False
    try:
        plt = pyplot()
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    series = sorted({(r["method"], r["dtype"], r["N"], r["k"]) for r in topk})
    for key in series:
        pts = sorted((r["B"], r["qps"]) for r in topk if (r["method"], r["dtype"], r["N"], r["k"]) == key)
        method, dtype, n, k = key
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} {dtype} N={n:,} k={k}")
    ax.set(xscale="log", yscale="log", xlabel="queries per call (B)", ylabel="queries / s",
           title=f"exact top-k, D={topk[0]['D']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--benches", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--n", type=int, nargs="+", help="index sizes (default 200k CPU, 1M and 13.35M GPU)")
    ap.add_argument("--b", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[8], help="top-k sizes (the Triton kernel: k <= 64)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, help="CPU timing repeats (default 5, quick 3)")
    ap.add_argument("--max-score-elems", type=int,
                    help="torch baseline: score block bound (default 2^26 on CPU, 2^30 = 4 GiB of fp32 on a GPU)")
    ap.add_argument("--mlse-b", type=int, nargs="+", default=[64, 1024, 16384])
    ap.add_argument("--mlse-k", type=int, nargs="+", default=[9, 65, 257])
    ap.add_argument("--no-faiss", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    want_triton = os.environ.get("REALM_HPC_KERNELS", "auto") == "triton"
    if device.type == "cpu" and want_triton:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel
    use_triton = device.type == "cuda" or want_triton
    if args.n is None:
        args.n = [20_011] if args.quick else [200_003] if device.type == "cpu" else [1_000_000, 13_350_000]
    if args.max_score_elems is None:
        args.max_score_elems = 1 << 30 if device.type == "cuda" else 1 << 26
    if args.quick:
        args.repeats = args.repeats or 3
        args.mlse_b, args.mlse_k = [64, 1024], [9, 257]
        if want_triton and device.type == "cpu":  # the interpreter runs a few ops per ms
            args.n, args.b, args.mlse_b = [2_000], [1, 8], [64]
    args.repeats = args.repeats or 5

    args.out.mkdir(parents=True, exist_ok=True)
    copy_gbs = copy_bandwidth_gbs(device, args.repeats, 1 << 30 if device.type == "cuda" else 1 << 27)
    meta = dict(device=device_name(device), device_type=device.type, git_sha=git_sha(),
                time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                versions=versions("torch", "triton", "numpy", "faiss-cpu", "faiss-gpu"), copy_gbs=copy_gbs,
                kernels_backend="triton" if use_triton else "torch", argv=sys.argv[1:] if argv is None else argv)
    print(f"{meta['device']}  sha {meta['git_sha']}  device copy bandwidth {copy_gbs:.1f} GB/s", flush=True)

    t0 = time.perf_counter()
    result = dict(meta=meta, rows=[], skipped=[], complete=False)

    def save() -> None:
        meta["wall_s"] = time.perf_counter() - t0
        write_atomic(args.out / "bench_kernels.json", json.dumps(result, indent=1).encode())

    if "ip_topk" in args.benches:
        bench_ip_topk(args, device, use_triton, copy_gbs, result, save)
    if "marginal" in args.benches:
        bench_marginal(args, device, use_triton, copy_gbs, result, save)
    result["complete"] = True
    save()
    rows = result["rows"]

    csv_path = args.out / "bench_kernels.csv"
    first = rows[0] if rows else {}
    fields = ["time", "device", "git_sha"] + sorted({k for r in rows for k in r}, key=lambda k: (k not in first, k))
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"time": meta["time"], "device": meta["device"], "git_sha": meta["git_sha"], **r})
    plotted = plot(rows, args.out / "bench_kernels_qps.png")
    print(f"wrote {args.out}/bench_kernels.{{json,csv}}{' and bench_kernels_qps.png' if plotted else ''} "
          f"in {meta['wall_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
