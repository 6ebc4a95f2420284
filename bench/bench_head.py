"""Peak memory and time of the reader's MLM head loss: kernels.target_logprob (chunked over V) vs the naive path.

The naive path is what the reader did before (and token_logprobs still does): full logits [n*T, V], a float32
log_softmax, then a gather (kernels.reference.target_logprob_reference). Both run forward + backward with
hidden, weight and bias trainable, at BERT-base sizes by default: V = 30,522, H = 768, n*T = 16*9*8 rows
(batch 16 x (8 docs + null doc) x 8 masked tokens).

Memory, per method, over one forward + backward, in MiB (hidden/weight/bias grads set to None first, so the new
gradients, the same bytes in both methods, are counted in both):
- peak_mb: the peak of live tensor bytes beyond the inputs. CUDA: torch.cuda.max_memory_allocated() -
  memory_allocated() at entry. CPU: torch's MemTracker (torch.distributed._tools), which counts every tensor
  allocation and free; the same quantity as on CUDA, without allocator rounding.
- device_peak_mb: the device's own view. CUDA: as peak_mb. CPU: growth of the process's peak resident memory
  (VmHWM after a reset, bench.utils.PeakRSS): pages glibc kept or touched, so allocator reuse and fragmentation
  (chunks below glibc's 32 MiB mmap threshold are recycled through the heap) blur it both ways.
- grads_mb: the gradients the step leaves (dominated by the [V, H] weight gradient, 89 MiB in fp32 at BERT-base,
  which any implementation must produce); extra_mb = peak_mb - grads_mb: the head's own transient and activation
  memory (logits, softmax, their gradients; chunks for the fused path). The naive path peaks in the log-softmax
  backward, before its weight gradient exists, so its extra_mb understates it: extra_ratio is a lower bound.
  With the weight gradient counted, peak_ratio can never exceed naive peak / grads_mb (4.3x at the defaults).
- saved_mb: bytes the autograd graph keeps from forward to backward beyond the inputs and parameters
  (torch.autograd.graph.saved_tensors_hooks, deduplicated by storage): what the head adds to a training step's
  activation memory while the encoder's backward is still to come.
*_ratio = naive / method (higher is better); speedup = naive p50 / method p50.

    python bench/bench_head.py --out runs/bench/head                  # CPU or GPU, defaults above
    python bench/bench_head.py --dtypes fp32 bf16 --chunk-sizes 0 1024 4096

Writes results.json and results.csv (bench.utils.write_results) and prints a Markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import utils  # noqa: E402  (after the sys.path insert: this file also runs as a script)
from kernels import target_logprob  # noqa: E402
from kernels.reference import target_logprob_reference  # noqa: E402
from kernels.target_logprob import default_chunk_size  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = [("method", "{}"), ("dtype", "{}"), ("rows", "{}"), ("vocab", "{}"), ("hidden", "{}"), ("chunk", "{}"),
           ("p50_ms", "{:.1f}"), ("p20_ms", "{:.1f}"), ("p80_ms", "{:.1f}"), ("speedup", "{:.2f}"),
           ("peak_mb", "{:.1f}"), ("peak_ratio", "{:.2f}"), ("grads_mb", "{:.1f}"), ("extra_mb", "{:.1f}"),
           ("extra_ratio", "{:.2f}"), ("saved_mb", "{:.3f}"), ("saved_ratio", "{:.0f}"),
           ("device_peak_mb", "{:.1f}"), ("device_peak_ratio", "{:.2f}")]


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the storages autograd saves for backward during ``fn()``, excluding those of ``exclude``."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(x):
        nonlocal total
        ptr = x.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    del out
    return total


def tracked_peak_mb(step, inputs: list[torch.Tensor]) -> float:
    """Peak bytes of live torch tensors during ``step()`` beyond ``inputs``, counted by torch's MemTracker (a
    dispatch mode that sees every allocation and, through weak references, every free): exact on any device."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        step()
    total = sum(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())
    return (total - sum(x.untyped_storage().nbytes() for x in inputs)) / 2**20


def peak_mb(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with utils.PeakRSS() as rss:
        step()
    return float("nan") if rss.mb is None else rss.mb


def bench_one(args, device: torch.device, dname: str) -> list[dict]:
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(0)
    rows_n, vocab, hid = args.rows, args.vocab, args.hidden
    n, T = rows_n // args.tokens, args.tokens
    h = (torch.randn(n, T, hid, generator=g)).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hid, generator=g) * 0.02).to(device, dtype).requires_grad_()
    b = torch.zeros(vocab).to(device, dtype).requires_grad_()
    t = torch.randint(0, vocab, (n, T), generator=g).to(device)
    m = torch.ones(n, T, device=device)
    m[:, T - 2:] = 0  # some padded positions, as in real batches

    def clear():
        h.grad = w.grad = b.grad = None

    def step_fn(fn):
        def step():
            clear()
            fn().sum().backward()
        return step

    def measure(fn):
        """(peak MiB, MiB of the gradients the step leaves behind): grads are freed before, not inside, the
        measured block, or the allocator would hand the old weight gradient's pages straight to the new one."""
        clear()
        mb = peak_mb(lambda: fn().sum().backward(), device)
        grads = sum(x.grad.nbytes for x in (h, w, b)) / 2**20
        clear()
        live = tracked_peak_mb(lambda: fn().sum().backward(), [h, w, b, t, m]) if device.type == "cpu" else mb
        return live, mb, grads

    methods = {("naive", "-"): lambda: target_logprob_reference(h, w, b, t, m)}
    for c in args.chunk_sizes:
        chunk = c or default_chunk_size(n * T, vocab)
        methods[("chunked", f"{chunk}" + (" (auto)" if not c else ""))] = (
            lambda chunk=chunk: target_logprob(h, w, b, t, m, chunk_size=chunk))
    steps = {key: step_fn(fn) for key, fn in methods.items()}
    times = utils.time_interleaved(steps, device, min_repeats=args.repeats, max_repeats=args.repeats)
    out = []
    for key, fn in methods.items():
        runs = [measure(fn) for _ in range(args.memory_repeats)]
        live, _, grads = min(runs)
        p = times[key]
        out.append(dict(method=key[0], dtype=dname, rows=n * T, vocab=vocab, hidden=hid, chunk=key[1],
                        p20_ms=p[0], p50_ms=p[1], p80_ms=p[2], peak_mb=live, device_peak_mb=min(r[1] for r in runs),
                        grads_mb=grads, extra_mb=live - grads, saved_mb=saved_bytes(fn, [h, w, b, t, m]) / 2**20))
    clear()
    naive = out[0]
    for r in out:
        r["speedup"] = naive["p50_ms"] / r["p50_ms"]
        for k in ("peak", "device_peak", "extra", "saved"):
            r[f"{k}_ratio"] = naive[f"{k}_mb"] / r[f"{k}_mb"] if r[f"{k}_mb"] > 0 else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "head")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=16 * 9 * 8, help="n*T masked positions (n = rows / tokens)")
    ap.add_argument("--tokens", type=int, default=8, help="T: masked tokens per sequence")
    ap.add_argument("--vocab", type=int, default=30_522)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[0], help="0 = the default chunk")
    ap.add_argument("--repeats", type=int, default=3, help="timed forward+backward calls per method")
    ap.add_argument("--memory-repeats", type=int, default=2, help="peak-memory runs per method (the min is kept)")
    args = ap.parse_args(argv)
    if args.rows % args.tokens:
        ap.error(f"--rows {args.rows} is not a multiple of --tokens {args.tokens}")

    device = torch.device(args.device)
    meta = utils.run_meta(device, packages=("torch",))
    method = "cuda_max_memory_allocated" if device.type == "cuda" else f"mem_tracker+{utils.PeakRSS.method}"
    meta.update(config=vars(args) | {"out": str(args.out)}, memory_method=method)
    print(f"{meta['device']}  sha {meta['git_sha']}  memory: {meta['memory_method']}", flush=True)
    t0 = time.perf_counter()
    rows = [r for d in args.dtypes for r in bench_one(args, device, d)]
    meta["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    utils.write_results(args.out, dict(meta=meta, rows=rows), COLUMNS, stamp_keys=("memory_method",))
    print("\n" + utils.markdown(rows, COLUMNS))
    print(f"\nwrote {args.out}/results.json, results.csv in {meta['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
