"""The Python half of bench/gpu_check.sh: install what a bare GPU image lacks, describe the environment, write the
summary. Only the standard library at import time: it must run where torch, or anything else, does not.

    python bench/gpu_check.py install WHEEL_DIR WORK   # the bundle's wheels the image lacks; MPI made to work
    python bench/gpu_check.py env WORK                 # versions, CUDA, nvidia-smi -> WORK/env.json, WORK/env.sh
    python bench/gpu_check.py summary OUT WORK         # OUT/summary.json, OUT/summary.md, OUT/steps.log

WORK is the script's scratch folder: steps.tsv (one line per step: name, status, seconds, limit, exit code, why),
NAME.log (each step's output) and the benches' own result files. A step that decides to skip writes NAME.skip (the
reason) and exits 0; NAME.detail holds an optional one-line detail.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPI_DISTS = ("mpich", "mpi4py")  # installed only when the image's MPI does not run two ranks (install_mpi)
TAIL_LINES = 30  # log lines a failed step shows in the summary
# Rank 0 of each world prints every rank's world size and the MPI library (its first line): one line "2 2 | MPICH
# Version: ..." from a working pair; two lines "1 | ..." from ranks that each started alone (a launcher that does
# not match the library mpi4py loaded).
MPI_PROBE = ("from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allgather(c.Get_size()); "
             "lib = ' '.join(MPI.Get_library_version().splitlines()[0].split()); "
             "c.Get_rank() or print(*s, '|', lib, flush=True)")
# (distribution, module, what the check needs it for)
MODULES = [
    ("torch", "torch", "everything"), ("triton", "triton", "the compiled kernels"),
    ("transformers", "transformers", "encoders and reader"), ("tokenizers", "tokenizers", "the demo's vocabulary"),
    ("numpy", "numpy", "everything"), ("regex", "regex", "QA answer matching"), ("tqdm", "tqdm", "progress bars"),
    ("safetensors", "safetensors", "export"), ("pytest", "pytest", "the GPU tests"),
    ("mpi4py", "mpi4py", "the MPI refresher"), ("deepspeed", "deepspeed", "the DeepSpeed trainer test"),
    ("faiss", "faiss", "the faiss-gpu baseline (optional)"), ("matplotlib", "matplotlib", "plots (optional)"),
    ("tensorboard", "tensorboard", "TensorBoard events (optional)"),
]


def write_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename (realm_hpc.checkpoint.atomic_write imports torch, which may be what is broken)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------- install

def dist_name(wheel: Path) -> str:
    """A wheel file's distribution, normalized (PEP 503): pydantic_core-2.5-... -> pydantic-core."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def installed(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    for name in (dist, dist.replace("-", "_")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def pip_install(wheels: list[Path], site: Path) -> None:
    """Into the prefix ``site`` (not --target, which drops the mpich wheel's lib/ with libmpi)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--no-warn-script-location", "--prefix",
                    str(site), *map(str, wheels)], check=True, env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})


def site_env(site: Path) -> dict[str, str]:
    """The variables that add the prefix ``site``: its packages after the PYTHONPATH the script set (the checkout
    first), its bin/ and lib/ first on their paths."""
    env = {}
    packages = sorted(site.glob("lib/python*/*-packages"))
    if packages:
        env["PYTHONPATH"] = os.pathsep.join([os.environ.get("PYTHONPATH") or str(ROOT), *map(str, packages)])
    if (site / "bin").is_dir():
        env["PATH"] = f"{site / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    if (site / "lib").is_dir():  # mpi4py finds the mpich wheel's libmpi.so.12 through the loader's path
        old = os.environ.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = str(site / "lib") + (os.pathsep + old if old else "")
    return env


def mpi_probe(env: dict[str, str]) -> tuple[bool, str]:
    """(True, 'MPIEXEC: LIBRARY') when `mpiexec -n 2` runs two mpi4py ranks of one world, else (False, why)."""
    mpiexec = shutil.which("mpiexec", path=env.get("PATH"))
    if mpiexec is None:
        return False, "no mpiexec on PATH"
    try:
        proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", MPI_PROBE], env=env, capture_output=True,
                              text=True, timeout=90)
    except subprocess.TimeoutExpired:
        return False, f"{mpiexec} -n 2 did not finish in 90 s"
    lines = [ln for ln in proc.stdout.splitlines() if "|" in ln]
    if proc.returncode == 0 and len(lines) == 1 and lines[0].startswith("2 2 |"):
        return True, f"{mpiexec}: {lines[0].split('|', 1)[1].strip()}"
    said = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
    sizes = [ln.split("|")[0].strip() for ln in lines]
    return False, f"{mpiexec} -n 2: exit {proc.returncode}, world sizes {sizes}: {said}"


def install(wheel_dir: Path, work: Path) -> int:
    """Install the bundle's wheels whose distribution the image lacks; then make MPI run two ranks: the image's
    MPI as it is, else the bundle's mpich, else mpich and mpi4py. Writes site.env (sourced by the script),
    mpi.txt ('ok ...' or 'no ...') and wheels.json. A pip that fails is reported (exit 1) and the rest goes on."""
    site = work / "site"
    errors = []

    def add(names: list[str]) -> None:
        try:
            pip_install([wheel_dir / name for name in names], site)
            report["installed"] += names
        except (OSError, subprocess.CalledProcessError) as exc:
            errors.append(f"pip install {' '.join(names)}: {exc}")

    wheels = {dist_name(w): w for w in sorted(wheel_dir.glob("*.whl"))} if wheel_dir.is_dir() else {}
    report = {"bundle": str(wheel_dir), "bundle_wheels": sorted(w.name for w in wheels.values()),
              "bundle_mib": sum(w.stat().st_size for w in wheels.values()) / 2**20, "installed": [], "present": {},
              "errors": errors}
    missing = []
    for dist, wheel in wheels.items():
        version = installed(dist)
        if version is not None:
            report["present"][dist] = version
        elif dist not in MPI_DISTS:
            missing.append(wheel.name)
    if missing:
        add(missing)
    env = {**os.environ, **site_env(site)}
    ok, said = mpi_probe(env)
    tried = [f"image: {said}"]
    for extra in (["mpich"], ["mpich", "mpi4py"]):
        if ok or not all(d in wheels for d in extra):
            continue
        add([wheels[d].name for d in extra if wheels[d].name not in report["installed"]])
        env = {**os.environ, **site_env(site)}
        ok, said = mpi_probe(env)
        tried.append(f"bundle's {' + '.join(extra)}: {said}")
    report["mpi"] = {"ok": ok, "tried": tried}
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in site_env(site).items())
    write_atomic(work / "site.env", exports)
    write_atomic(work / "mpi.txt", ("ok " if ok else "no ") + said + "\n")
    write_atomic(work / "wheels.json", json.dumps(report, indent=1) + "\n")
    print(f"bundle {wheel_dir}: {len(wheels)} wheels, {report['bundle_mib']:.1f} MiB; installed into {site}: "
          f"{', '.join(report['installed']) or 'nothing'}\nMPI: " + "\n     ".join(tried))
    if not wheels:
        write_atomic(work / "wheels.skip", f"no wheel bundle at {wheel_dir} (make gpu-wheels); MPI: {said}\n")
    else:
        write_atomic(work / "wheels.detail",
                     f"installed {len(report['installed'])} of {len(wheels)} bundled wheels "
                     f"({', '.join(dist_name(Path(n)) for n in report['installed']) or 'none missing'}); "
                     f"MPI: {said}\n")
    print("\n".join(errors), file=sys.stderr)
    return 1 if errors else 0


# -------------------------------------------------------------------------------------------------------------- env

def _module(dist: str, module: str, site: Path) -> dict:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # absent, or present and broken (an ABI mismatch raises more than ImportError)
        return {"version": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    version = getattr(mod, "__version__", None) or installed(dist)
    where = getattr(mod, "__file__", None) or ""
    return {"version": str(version), "from": "bundle" if str(site) in where else "image", "path": where}


def _run_text(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd[0]}: {exc}"


def env(work: Path) -> int:
    site = work / "site"
    info = {"python": platform.python_version(), "executable": sys.executable, "host": socket.gethostname(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "git": _git(),
            "dry": bool(os.environ.get("GPU_CHECK_DRY"))}
    info["modules"] = {module: {**_module(dist, module, site), "for": why} for dist, module, why in MODULES}
    cuda = {"available": False}
    if info["modules"]["torch"]["version"]:
        import torch

        cuda = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
        if cuda["available"]:
            props = torch.cuda.get_device_properties(0)
            cuda.update(devices=torch.cuda.device_count(), name=props.name, capability=[props.major, props.minor],
                        memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count,
                        bf16=torch.cuda.is_bf16_supported())
    if info["modules"]["triton"]["version"]:
        try:
            import triton

            cuda["triton_target"] = str(triton.runtime.driver.active.get_current_target())
        except Exception as exc:  # no driver (CPU): Triton says so here, not at import
            cuda["triton_target"] = f"none ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    info["cuda"] = cuda
    smi = shutil.which("nvidia-smi")
    info["nvidia_smi"] = _run_text([smi]) if smi else "nvidia-smi not found"
    info["nvidia_smi_query"] = _run_text([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                          "clocks.max.mem,power.limit", "--format=csv"]) if smi else None
    write_atomic(work / "env.json", json.dumps(info, indent=1) + "\n")
    flags = {"HAVE_TORCH": info["modules"]["torch"]["version"] is not None, "HAVE_CUDA": cuda["available"],
             "HAVE_PYTEST": info["modules"]["pytest"]["version"] is not None}
    write_atomic(work / "env.sh", "".join(f"{k}={int(v)}\n" for k, v in flags.items()))
    write_atomic(work / "env.detail", _env_line(info) + "\n")
    for module, m in info["modules"].items():
        print(f"{module:<13} {m['version'] or 'absent':<24} {m.get('from') or m.get('error', '')}")
    print(json.dumps(cuda, indent=1))
    print(info["nvidia_smi"])
    return 0


def _env_line(info: dict) -> str:
    c, m = info["cuda"], info["modules"]
    gpu = (f"{c['name']} (sm_{''.join(map(str, c['capability']))}, {c['memory_gib']:.0f} GiB)" if c["available"]
           else "no CUDA device")
    return (f"{gpu}; torch {m['torch']['version'] or 'absent'} (CUDA {c.get('torch_cuda')}), "
            f"triton {m['triton']['version'] or 'absent'}, python {info['python']}")


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout here)"


# ---------------------------------------------------------------------------------------------------------- summary

def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; a missing or None cell prints as '-' (bench.utils.markdown needs torch: not here)."""
    lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else fmt.format(r[c]) for c, fmt in columns) + " |")
    return "\n".join(lines)


def _pytest(work: Path, name: str) -> tuple[str, dict, str] | None:
    """pytest's JUnit XML: every test's outcome, the counts as the step's detail."""
    try:
        root = ET.parse(work / f"{name}.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag, word in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                text = (el.get("message") or el.text or "").strip()
                outcome, message = word, text.splitlines()[0][:300] if text else None
                break
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {w: sum(t["outcome"] == w for t in tests) for w in ("passed", "failed", "error", "skipped")}
    detail = ", ".join(f"{n} {w}" for w, n in counts.items() if n or w in ("passed", "failed"))
    md = _table(tests, [("test", "{}"), ("outcome", "{}"), ("seconds", "{:.1f}"), ("message", "{}")])
    return detail, {"counts": counts, "tests": tests}, md


def _kernels(work: Path, name: str) -> tuple[str, dict, str] | None:
    res = _json(work / name / "bench_kernels.json")
    if not res:
        return None
    meta, rows = res["meta"], res["rows"]
    state = "all cells" if res.get("complete") else "cut short: the cells finished before it stopped"
    head = (f"{meta['device']}, kernels: {meta.get('kernels_backend')}, copy bandwidth {meta['copy_gbs']:.1f} GB/s "
            f"(measured in the same run); {state}")
    skipped = "".join(f"\n\nskipped: {s['method']} (N={s.get('N')}): {s['why']}" for s in res.get("skipped", []))
    if name == "ip_topk":
        ours = [r for r in rows if r["method"].startswith("kernels.")]
        best = max(ours, key=lambda r: r["frac_copy_bw"], default=None)
        detail = f"{len(ours)} cells" + (f"; best {best['frac_copy_bw']:.2f} of copy bandwidth (B={best['B']}, "
                                        f"k={best['k']})" if best else "")
        sizes = sorted({(r["N"], r["D"], r["dtype"]) for r in ours})
        head = ", ".join(f"{n:,} x {d} {t}" for n, d, t in sizes) + f"; {head}"
        cols = [("B", "{}"), ("k", "{}"), ("method", "{}"), ("p50_ms", "{:.3f}"), ("p20_ms", "{:.3f}"),
                ("p80_ms", "{:.3f}"), ("qps", "{:,.0f}"), ("gbs", "{:.1f}"), ("frac_copy_bw", "{:.3f}"),
                ("recall", "{:.4f}"), ("speedup_vs_torch_mm_topk", "{:.2f}"), ("speedup_vs_faiss", "{:.2f}")]
    else:
        detail = f"{sum(r['method'].startswith('kernels.') for r in rows)} cells"
        rows = [{**r, "docs": r["N"]} for r in rows]
        cols = [("B", "{}"), ("docs", "{}"), ("dtype", "{}"), ("method", "{}"), ("p50_ms", "{:.3f}"),
                ("p20_ms", "{:.3f}"), ("p80_ms", "{:.3f}"), ("gbs", "{:.2f}"), ("speedup_vs_torch_naive", "{:.2f}")]
    return detail, res, head + skipped + "\n\n" + _table(rows, cols)


def _head(work: Path, name: str) -> tuple[str, dict, str] | None:
    res = _json(work / name / "results.json")
    if not res:
        return None
    chunked = [r for r in res["rows"] if r["method"] == "chunked"]
    detail = "; ".join(f"{r['dtype']} chunk {r['chunk']}: peak {r['peak_ratio']:.2f}x lower" for r in chunked
                       if r.get("peak_ratio"))
    cols = [("method", "{}"), ("dtype", "{}"), ("chunk", "{}"), ("rows", "{}"), ("vocab", "{}"), ("hidden", "{}"),
            ("p50_ms", "{:.2f}"), ("speedup", "{:.2f}"), ("peak_mb", "{:.1f}"), ("peak_ratio", "{:.2f}"),
            ("grads_mb", "{:.1f}"), ("extra_mb", "{:.1f}"), ("extra_ratio", "{:.2f}"), ("saved_mb", "{:.3f}")]
    return detail, res, f"{res['meta']['device']}, memory: {res['meta'].get('memory_method')}\n\n" + _table(
        res["rows"], cols)


def _train_step(work: Path, name: str) -> tuple[str, dict, str] | None:
    res = _json(work / name / "results.json")
    if not res:
        return None
    total = next((r for r in res["rows"] if r["phase"] == "total"), None)
    model = res["meta"].get("model", {})
    detail = (f"{total['p50_ms']:.1f} ms per step (p50) on {model.get('device', res['meta']['device'])}"
              if total else "")
    head = (f"{res['meta']['device']}; recipe {model.get('recipe')}, {model.get('corpus_docs')} docs, batch "
            f"{model.get('batch_size')}, k {model.get('k')}, refresh every {model.get('refresh_every')} (inline)")
    cols = [("phase", "{}"), ("mean_ms", "{:.2f}"), ("p50_ms", "{:.2f}"), ("p20_ms", "{:.2f}"), ("p80_ms", "{:.2f}"),
            ("share", "{:.3f}"), ("steps", "{}")]
    return detail, {k: res[k] for k in ("meta", "rows", "swaps") if k in res}, head + "\n\n" + _table(
        res["rows"], cols)


def _demo(work: Path, name: str) -> tuple[str, dict, str] | None:
    """The run's summary.json; a run cut short: how far metrics.jsonl says it got."""
    run = work / name
    summary = _json(run / "summary.json")
    if summary:
        k = summary.get("k", 8)

        def f(key: str, fmt: str = "{:.3f}") -> str:
            return "-" if summary.get(key) is None else fmt.format(summary[key])

        detail = (f"recall@{k} {f(f'recall_at_{k}_start')} -> {f(f'recall_at_{k}_after_ict')} (ICT) -> "
                  f"{f(f'recall_at_{k}')}; MLM acc {f('mlm_acc_retrieval')}; {f('index_versions', '{}')} index "
                  f"versions; {f('steps', '{}')} steps in {f('wall_s', '{:.0f}')} s")
        rows = [{"key": k_, "value": round(v, 4) if isinstance(v, float) else v} for k_, v in summary.items()
                if not isinstance(v, (dict, list))]
        return detail, {"summary": summary}, _table(rows, [("key", "{}"), ("value", "{}")])
    try:
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not metrics:
        return None
    last = metrics[-1]
    recalls = [m for m in metrics if "recall_at_k" in m]
    detail = (f"no summary: the run reached step {last.get('step')} ({last.get('phase', last.get('event', '?'))})"
              + (f", last recall@k {recalls[-1]['recall_at_k']:.3f} at step {recalls[-1]['step']}" if recalls else ""))
    return detail, {"last_metrics": metrics[-5:]}, "\n".join(json.dumps(m) for m in metrics[-5:])


def _wheels(work: Path, name: str) -> tuple[str, dict, str] | None:
    res = _json(work / "wheels.json")
    if not res:
        return None
    md = (f"bundle {res['bundle']}: {len(res['bundle_wheels'])} wheels, {res['bundle_mib']:.1f} MiB; installed: "
          f"{', '.join(' '.join(n.split('-')[:2]) for n in res['installed']) or 'nothing'}; already on the image: "
          f"{', '.join(f'{d} {v}' for d, v in res['present'].items()) or 'none'}\n\nMPI:\n"
          + "\n".join(f"- {t}" for t in res["mpi"]["tried"]))
    return "", res, md


def _env(work: Path, name: str) -> tuple[str, dict, str] | None:
    info = _json(work / "env.json")
    if not info:
        return None
    rows = [{"module": m, "version": v["version"] or "absent", "from": v.get("from") or v.get("error"),
             "for": v["for"]} for m, v in info["modules"].items()]
    md = (f"host {info['host']}, {info['cpus']} CPUs, {info['platform']}, python {info['python']} "
          f"({info['executable']}), git {info['git']}\n\nCUDA: `{json.dumps(info['cuda'])}`\n\n"
          + _table(rows, [("module", "{}"), ("version", "{}"), ("from", "{}"), ("for", "{}")])
          + f"\n\n```text\n{info['nvidia_smi']}\n```")
    return "", info, md


# the sections of summary.md, in order: step name -> (title, reader)
READERS = {"wheels": ("Wheels", _wheels), "env": ("Environment", _env),
           "pytest_gpu": ("pytest -m gpu (compiled Triton)", _pytest), "ip_topk": ("ip_topk", _kernels),
           "marginal_lse": ("Marginal LSE", _kernels), "head": ("Chunked MLM head (bench_head)", _head),
           "train_step": ("bench train-step", _train_step), "cuda_e2e": ("tests/test_cuda_e2e.py", _pytest),
           "demo_mpi": ("Demo pretraining with an MPI refresher", _demo)}


def summary(out: Path, work: Path) -> int:
    steps = []
    for line in (_read(work / "steps.tsv") or "").splitlines():
        name, status, seconds, limit, rc, why = (line.split("\t") + [""] * 6)[:6]
        steps.append({"step": name, "status": status, "seconds": float(seconds or 0),
                      "limit_s": int(limit) if limit.isdigit() else None, "rc": int(rc) if rc.lstrip("-").isdigit()
                      else None, "why": None if why in ("", "-") else why})
    results, sections, logs = {}, [], []
    for s in steps:
        name = s["step"]
        log = _read(work / f"{name}.log") or ""
        logs.append(f"===== {name}: {s['status']} ({s['seconds']:.0f} s) =====\n{log}\n")
        title, reader = READERS.get(name, (name, None))
        got = reader(work, name) if reader else None
        detail = _read(work / f"{name}.detail") or (got[0] if got else "")
        s["detail"] = detail or None
        if s["status"] == "failed":
            s["log_tail"] = log.splitlines()[-TAIL_LINES:]
        if got:
            results[name] = got[1]
        body = got[2] if got else ""
        if s["status"] == "failed":
            body = f"failed ({s['why']}); the log's last lines:\n\n```text\n" + "\n".join(s["log_tail"]) + \
                   "\n```\n\n" + body
        elif s["status"] == "skipped":
            body = f"skipped: {s['why']}\n\n" + body
        sections.append(f"## {title}\n\n{body.strip()}\n")
    info = _json(work / "env.json") or {}
    started = float(os.environ.get("GPU_CHECK_STARTED", time.time()))
    doc = {"check": "bench/gpu_check.sh", "dry": bool(os.environ.get("GPU_CHECK_DRY")),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": time.time() - started,
           "budget_s": int(os.environ.get("GPU_CHECK_BUDGET_S", "0")) or None, "git": info.get("git"),
           "gpu": (info.get("cuda") or {}).get("name"), "steps": steps, "results": results}
    counts = {w: sum(s["status"] == w for s in steps) for w in ("ok", "failed", "skipped")}
    md = [f"# GPU check{' (dry run, CPU, toy sizes)' if doc['dry'] else ''}: {doc['gpu'] or 'no GPU'}",
          "", f"{doc['finished']}, git {doc['git']}, {doc['wall_s']:.0f} s of a {doc['budget_s']} s budget; steps: "
          + ", ".join(f"{n} {w}" for w, n in counts.items()), "",
          _table(steps, [("step", "{}"), ("status", "{}"), ("seconds", "{:.0f}"), ("limit_s", "{}"),
                         ("detail", "{}"), ("why", "{}")]), "", *sections]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "summary.json", json.dumps(doc, indent=1, default=str) + "\n")
    write_atomic(out / "summary.md", "\n".join(md))
    write_atomic(out / "steps.log", "\n".join(logs))
    return 0


def main(argv: list[str]) -> int:
    usage = "usage: gpu_check.py install WHEEL_DIR WORK | env WORK | summary OUT WORK"
    if len(argv) < 2 or argv[0] not in ("install", "env", "summary"):
        print(usage, file=sys.stderr)
        return 2
    cmd, *paths = argv
    paths = [Path(p) for p in paths]
    if cmd == "install" and len(paths) == 2:
        return install(*paths)
    if cmd == "env" and len(paths) == 1:
        return env(*paths)
    if cmd == "summary" and len(paths) == 2:
        return summary(*paths)
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
