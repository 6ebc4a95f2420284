"""Ahead-of-time compile every kernel configuration the launchers can produce, for real GPUs, on any machine.

The interpreter accepts code that no GPU compiler would (non-constexpr globals, unsupported ops, bad shapes), and
says nothing of registers or memory traffic. So CI runs ``python -m kernels.aot --check`` on CPU: every config is
compiled to a cubin for sm_80 and sm_90 (Triton's bundled ptxas; no GPU needed), and

- ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) gives registers, stack, local and static shared
  memory; Triton's metadata gives the dynamic shared memory. A spill shows as LOCAL or STACK > 0 and as local
  loads/stores (LDL/STL) in the SASS: any of them fails the check, as does shared memory beyond the arch's limit;
- for a streaming kernel (``stream=True`` in its launch_configs), the PTX of its main loop must issue asynchronous
  copies (``cp.async`` or ``cp.async.bulk``: Triton's software pipeliner turned the tile loads into a ring of
  in-flight copies) and contain no nested loop (the pipeliner skips loops that contain loops).

A launch_configs entry is a dict (kernel, signature, constexprs, options, divisible, stream) or the older tuple
(kernel, signature, constexprs, options).
``divisible`` names the arguments a real launch specialises as multiples of 16: Triton does so for aligned pointers
(every torch allocation) and such ints, and without it loads are too narrow for cp.async; for a tuple, every
pointer argument.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

MODULES = ("kernels.ip_topk", "kernels.marginal_lse")
ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (opt-in), bytes
_ASYNC_COPY = re.compile(r"\bcp\.async\.(?:ca|cg)\.|\bcp\.async\.bulk\.(?!commit_group|wait_group)")
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _configs(module: str) -> list[dict]:
    out = []
    for entry in importlib.import_module(module).launch_configs():
        if isinstance(entry, tuple):
            fn, sig, const, opts = entry
            entry = dict(kernel=fn, signature=sig, constexprs=const, options=opts, stream=False,
                         divisible=tuple(a for a, t in sig.items() if t.startswith("*")))
        out.append(entry)
    return out


def loops(ptx: str) -> list[tuple[int, int]]:
    """Line spans [header, last back edge] of the loops in a PTX listing, outermost first.

    A branch to a label at or above it is a back edge; spans that overlap belong to one loop (a loop's cold blocks
    may sit below its latch and branch back up into it).
    """
    lines = ptx.splitlines()
    where = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    last: dict[int, int] = {}  # header line -> its last back edge
    for i, line in enumerate(lines):
        if (m := _BRANCH.search(line)) and m.group(1) in where and where[m.group(1)] <= i:
            last[where[m.group(1)]] = i
    merged: list[list[int]] = []
    for a, b in sorted(last.items()):
        if merged and merged[-1][0] < a <= merged[-1][1] < b:
            merged[-1][1] = b  # overlapping, not nested: one loop
        else:
            merged.append([a, b])
    return sorted(((a, b) for a, b in merged), key=lambda s: (s[0], -s[1]))


def loop_report(ptx: str) -> dict:
    """The main loop (the outermost loop that issues the most async copies, else the first outermost one): async
    copies in it, and how many loops it contains."""
    lines = ptx.splitlines()
    spans = loops(ptx)
    outer = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
    if not outer:
        return {"loops": 0, "async_in_loop": 0, "nested_loops": 0,
                "async_total": sum(bool(_ASYNC_COPY.search(line)) for line in lines)}

    def n_async(a, b):
        return sum(bool(_ASYNC_COPY.search(line)) for line in lines[a:b + 1])

    main = max(outer, key=lambda s: (n_async(*s), -s[0]))
    inner = [s for s in spans if s != main and main[0] <= s[0] and s[1] <= main[1]]
    return {"loops": len(spans), "async_in_loop": n_async(*main), "nested_loops": len(inner),
            "async_in_nested": sum(n_async(*s) for s in inner),
            "async_total": sum(bool(_ASYNC_COPY.search(line)) for line in lines)}


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(cubin: bytes) -> dict:
    """Registers, stack, static shared and local memory (cuobjdump), local loads/stores in the SASS (spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    m = _RESOURCES.search(usage)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local,
            "local_ldst": len(re.findall(r"\b(?:LDL|STL)\b", sass))}


def compile_one(module: str, i: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _configs(module)[i]
    fn, sig, const = cfg["kernel"], cfg["signature"], cfg["constexprs"]
    full = {a: ("constexpr" if a in const else sig[a]) for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in cfg["divisible"] if a not in const}
    t = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, full, const, attrs), target=GPUTarget("cuda", arch, 32),
                              options=cfg["options"])
    secs = time.perf_counter() - t
    ptx = compiled.asm["ptx"]
    if f".target sm_{arch}" not in ptx:
        raise RuntimeError(f"{fn.__name__} {const}: PTX does not target sm_{arch}")
    shown = {k: v for k, v in const.items() if k.isupper() and k not in ("B", "D", "BLOCK_D", "UPCAST", "COUNT")}
    row = {"kernel": fn.__name__, "arch": arch, "dtype": sig.get(next(iter(sig))), "constexprs": shown,
           "generic": not cfg["divisible"], "b1": const.get("B") == 1, **cfg["options"],
           "shared": compiled.metadata.shared, "stream": cfg["stream"], "secs": round(secs, 2)}
    row.update(resources(compiled.asm["cubin"]))
    row.update(loop_report(ptx))
    row["problems"] = problems(row)
    return row


def problems(row: dict) -> list[str]:
    """What fails the check for one compiled config."""
    out = []
    if row["local"] or row["stack"] or row["local_ldst"]:
        out.append(f"spills (LOCAL {row['local']}, STACK {row['stack']}, {row['local_ldst']} LDL/STL)")
    if row["shared"] + row["static_shared"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared'] + row['static_shared']} > {SMEM_LIMIT[row['arch']]}")
    if row["stream"] and not row["async_in_loop"]:
        out.append("no async copy in the main loop")
    if row["stream"] and row["nested_loops"]:
        out.append(f"{row['nested_loops']} loop(s) nested in the main loop")
    return out


def format_row(r: dict) -> str:
    c = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
    tag = " generic" if r["generic"] else " B=1" if r["b1"] else ""
    return (f"sm_{r['arch']} {r['kernel']:<28} {r['dtype']:<5} {c}{tag} warps={r['num_warps']} "
            f"stages={r.get('num_stages', '-')} | regs={r['regs']} shared={r['shared'] + r['static_shared']} "
            f"local={r['local']} stack={r['stack']} ldl/stl={r['local_ldst']} | async copies in loop="
            f"{r['async_in_loop']} nested loops={r['nested_loops']} | {r['secs']:.1f}s"
            + (" | FAIL: " + "; ".join(r["problems"]) if r["problems"] else ""))


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--modules", nargs="+", default=list(MODULES))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--check", action="store_true", help="exit 1 if any config spills, overflows shared memory or "
                                                          "(streaming kernels) issues no async copy in its loop")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    if not os.path.exists(_tool("cuobjdump")):
        print(f"kernels.aot: {_tool('cuobjdump')} missing (this triton wheel ships no CUDA tools)", file=sys.stderr)
        return 2
    work = [(m, i, a) for m in args.modules for i in range(len(_configs(m))) for a in args.arch]
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
        for row in pool.map(compile_one, *zip(*work)):
            rows.append(row)
            print(format_row(row), flush=True)
    bad = [r for r in rows if r["problems"]]
    import triton

    print(f"compiled {len(rows)} kernel configs with triton {triton.__version__} in {time.perf_counter() - t0:.1f}s; "
          f"{len(bad)} with problems")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
