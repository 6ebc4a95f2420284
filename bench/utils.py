"""What every benchmark script shares: timing, the copy-bandwidth roofline, peak memory, run metadata, atomic output.

Timing: triton.testing.do_bench quantiles on GPU; time.perf_counter repeats on CPU (interleaved across the methods
of one cell, so a neighbour's load spike hits every method alike instead of one).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from realm_hpc.checkpoint import atomic_write

ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (20, 50, 80)


# ---------------------------------------------------------------------------------------------------------- timing

def quantiles_ms(fn, device: torch.device, repeats: int) -> list[float]:
    """[p20, p50, p80] in ms of one method."""
    return time_interleaved({"fn": fn}, device, min_repeats=repeats, max_repeats=repeats)["fn"]


def time_interleaved(fns: dict, device: torch.device, min_repeats: int = 3, max_repeats: int = 50,
                     min_time_s: float = 0.0, rewarm_below_ms: float = 50.0) -> dict[str, list[float]]:
    """{name: [p20, p50, p80] ms}. CPU: one warm-up call each (allocator, thread start, lazy imports), then rounds
    that call every method in turn, until min_repeats rounds and min_time_s have passed, or max_repeats rounds.

    Interleaving spreads a neighbour's load over all methods, but a switch costs the next call: the previous
    method's OpenMP team spins for a few ms after its region and takes the cores, and this method's own team has
    gone to sleep. Measured at 50k x 128: a search timed right after faiss's ran 1.4-1.6x slower than back to back.
    So with several methods, a call shorter than rewarm_below_ms is preceded by an untimed one: each method is timed
    in its steady state, as in a serving loop.
    """
    if device.type == "cuda":
        import triton.testing

        return {name: list(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[q / 100 for q in QUANTILES]))
                for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start < min_time_s):
        for name, fn in fns.items():
            if len(fns) > 1 and (not times[name] or times[name][-1] < rewarm_below_ms):
                fn()
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
        rounds += 1
    return {name: [float(x) for x in np.percentile(v, QUANTILES)] for name, v in times.items()}


def copy_bandwidth_gbs(device: torch.device, repeats: int, nbytes: int) -> float:
    """Large array copy, (read + write) bytes / p50 time: the practical ceiling for a bandwidth-bound search."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    p50 = quantiles_ms(lambda: dst.copy_(src), device, repeats)[1]
    return 2 * nbytes / (p50 * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------------- memory

class PeakRSS:
    """Peak resident-memory growth over a ``with`` block, in MB: Linux VmHWM after resetting it through
    /proc/self/clear_refs, minus VmRSS at entry. Counts every allocator (torch, numpy, faiss's C++), unlike
    tracemalloc. Freed heap memory is first handed back (malloc_trim), or reusing it would not count.
    ``mb`` is None where the kernel does not offer the reset (then ``method`` says so)."""

    method = "rss_hwm_delta"

    def __enter__(self):
        self.mb = None
        self._base = None
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kb("VmRSS")
        except OSError:
            self.method = "unavailable"
        return self

    def __exit__(self, *exc):
        if self._base is not None:
            self.mb = max(0.0, (_status_kb("VmHWM") - self._base) / 1024)
        return False


def _malloc_trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


# -------------------------------------------------------------------------------------------------------- metadata

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def run_meta(device: torch.device, packages=("torch", "numpy", "faiss-cpu", "faiss-gpu", "triton")) -> dict:
    """Who, where and what: written into every JSON and on every CSV row."""
    return dict(machine=socket.gethostname(), cpu=cpu_model(), cores=os.cpu_count(),
                omp_threads=torch.get_num_threads(), device=device_name(device), device_type=device.type,
                git_sha=git_sha(), time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                versions=versions(*packages))


# ---------------------------------------------------------------------------------------------------------- output

def write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def markdown(rows: list[dict], columns: list[tuple[str, str]], header: bool = True) -> str:
    """One Markdown table: ``columns`` are (key, format) pairs; a missing or None value prints as '-'."""
    lines = []
    if header:
        lines += ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = ["-" if r.get(c) is None else fmt.format(r[c]) for c, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, result: dict, columns: list[tuple[str, str]], stamp_keys=()) -> None:
    """results.json (the whole ``result``: meta + rows + ...) and results.csv: one row per result row, the table's
    columns first, every row stamped with time, machine, device, git sha and versions (+ ``stamp_keys`` of meta)."""
    meta, rows = result["meta"], result["rows"]
    write_atomic(out / "results.json", (json.dumps(result, indent=1) + "\n").encode())
    stamp = {"time": meta["time"], "machine": meta["machine"], "device": meta["device"], "git_sha": meta["git_sha"],
             "versions": json.dumps(meta["versions"], sort_keys=True), **{k: meta[k] for k in stamp_keys}}
    fields = list(stamp) + [c for c, _ in columns] + sorted({k for r in rows for k in r} - {c for c, _ in columns})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({**stamp, **r})
    write_atomic(out / "results.csv", buf.getvalue().encode())


def save_figure(fig, path: Path) -> None:
    """PNG written to a temp name and renamed (realm_hpc.checkpoint.atomic_write), then the figure is closed."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------------- models

def recipe_data(recipe: str, overrides: list[str], out: Path):
    """(Config, PretrainData) of a named recipe with --set overrides; the tokenized corpus is cached under
    out/cache/<hash of the model and data sections>, so a second run of a bench reuses it."""
    import hashlib

    from realm_hpc.config import apply_overrides
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.recipes import get_recipe

    cfg = apply_overrides(get_recipe(recipe), list(overrides))
    key = hashlib.sha1(json.dumps([cfg.to_dict()["model"], cfg.to_dict()["data"]], sort_keys=True).encode())
    return cfg, PretrainData(cfg, out / "cache" / key.hexdigest()[:12])


def with_overrides(cfg, overrides: dict, bench: str):
    """A bench dataclass with the given fields replaced (None = keep); an unknown field is a ValueError."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides:
        if key not in names:
            raise ValueError(f"bench {bench}: unknown setting {key!r}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
