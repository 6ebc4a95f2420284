"""Ahead-of-time compile every kernel configuration the launchers can produce, for real GPUs, on any machine.

The interpreter accepts code that no GPU compiler would (non-constexpr globals, unsupported ops, bad shapes),
so CI runs this on CPU: ``python -m kernels.aot`` lowers each config to PTX for sm_80 and sm_90. It stops at
PTX (ptxas, the slowest stage, is skipped) and must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

MODULES = ("kernels.ip_topk", "kernels.marginal_lse")
ARCHS = (80, 90)


def _ptx_only(*args):
    """Triton stage hook: called bare for a cache key, else with (backend, stages, ...) to edit the pipeline."""
    if not args:
        return "ptx-only", "ptx-only"
    args[1]["cubin"] = lambda src, metadata: src.encode()  # CompiledKernel wants a binary; the PTX stands in


def _configs(module: str):
    return list(importlib.import_module(module).launch_configs())


def compile_one(module: str, i: int, arch: int) -> tuple[str, float]:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.runtime.add_stages_inspection_hook = _ptx_only
    fn, sig, const, opts = _configs(module)[i]
    full = {a: ("constexpr" if a in const else sig[a]) for a in fn.arg_names}
    t = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, full, const), target=GPUTarget("cuda", arch, 32), options=opts)
    ptx = compiled.asm["ptx"]
    if f".target sm_{arch}" not in ptx:
        raise RuntimeError(f"{fn.__name__} {const}: PTX does not target sm_{arch}")
    return f"{fn.__name__} sm_{arch} {const}", time.perf_counter() - t


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    work = [(m, i, a) for m in MODULES for i in range(len(_configs(m))) for a in args.arch]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
        for name, secs in pool.map(compile_one, *zip(*work)):
            print(f"ok {secs:5.2f}s {name}", flush=True)
    print(f"compiled {len(work)} kernel configs in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
