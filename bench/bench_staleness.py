"""What a stale index costs: one recipe pretrained at several refresh intervals, same seed and data.

    realm-hpc bench staleness --quick          # a small world, <= 15 min on 2 quiet cores
    realm-hpc bench staleness                  # demo recipe: refresh.every 25 / 100 / 400 / never, + MPI at 25
    realm-hpc bench staleness --recipe tiny --intervals 4 never --mpi-intervals

Each row is one `realm-hpc pretrain` (the Pretrainer of realm_hpc/train.py, nothing re-implemented) in OUT/<row>/:
inline rows as `python -m realm_hpc pretrain`, the MPI row as `mpiexec -n 2 python -m realm_hpc pretrain
--refreshers 1` (one trainer, one refresher rank), every row a subprocess with the same environment so their
steps/s compare. `refresh.every=0` ("never") keeps the index built after ICT for the whole run. A row whose
summary.json exists is read, not rerun; a row killed midway continues with `--resume` from its checkpoint, so a
killed sweep continues where it stopped. The rows skip the closed-book baseline (it does not depend on the index).

Per row, from its summary.json: final recall@k and MLM accuracy with retrieval on the test split (both on a fresh
index of the final encoders: what the stale index did to learning), its accuracy per masked span and the paired
comparison of its spans with the most frequent inline refresh's (the runs' mlm_span_hits.npy), mean and max
staleness, index versions, REALM steps/s (loop steps over the loop's own time: evaluation and checkpoints
excluded), the share of that time the trainer waited on the index, and the run's wall time. Writes results.json,
results.csv and staleness.png (recall@k and MLM accuracy against the refresh interval, steps/s on a second axis);
prints a Markdown table. Not a test: it asserts nothing, and says in `direction` whether the measurement follows
the seed's (staler -> lower recall@k and MLM accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import utils  # noqa: E402  (after the sys.path insert: this file also runs as a script)
from realm_hpc.checkpoint import atomic_write_json  # noqa: E402
from realm_hpc.config import ConfigError, apply_overrides  # noqa: E402
from realm_hpc.evaluate import paired_sign_test, share  # noqa: E402
from realm_hpc.recipes import get_recipe  # noqa: E402
from realm_hpc.train import SPAN_HITS_FILE  # noqa: E402

VENV_BIN = Path(sys.executable).parent
ROW_SPEC = "bench_row.json"  # what a row directory was started with: a rerun with other settings must not reuse it
ROW_LOG = "pretrain.log"


@dataclass(kw_only=True)
class StalenessBench:
    recipe: str = "demo"
    overrides: list[str] = field(default_factory=list)  # --set on the recipe, every row (the row's refresh last)
    intervals: list[int] = field(default_factory=lambda: [25, 100, 400, 0])  # inline rows' refresh.every; 0 = never
    mpi_intervals: list[int] = field(default_factory=lambda: [25])  # these also with refresh.mode=mpi
    out: str = "runs/bench/staleness"


def quick() -> StalenessBench:
    """The demo's model and reader recipe on a third of its world (~1,000 docs; 150 test and 150 dev examples), ICT
    capped at 300 steps, 100 warm-up + 130 REALM steps: 5 rows in ~15 minutes of 2 cores."""
    return StalenessBench(
        overrides=["data.world_people=400", "data.world_orgs=80", "data.world_cities=30", "data.world_surnames=90",
                   "data.heldout_facts=200", "data.eval_examples=150", "ict.steps=300", "train.steps=230",
                   "train.reader_warmup_steps=100", "train.eval_every=1000", "train.checkpoint_every=100"],
        intervals=[10, 40, 160, 0], mpi_intervals=[10], out="runs/bench/staleness-quick")


def config(quick_run: bool = False, **overrides) -> StalenessBench:
    base = quick() if quick_run else StalenessBench()
    if overrides.get("overrides"):  # the user's --set come after the bench's own
        overrides["overrides"] = [*base.overrides, *overrides["overrides"]]
    cfg = utils.with_overrides(base, overrides, "staleness")
    if not cfg.intervals or min(cfg.intervals) < 0 or len(set(cfg.intervals)) < len(cfg.intervals):
        raise ConfigError("bench staleness: --intervals takes distinct refresh intervals >= 1 or 'never'")
    missing = sorted(set(cfg.mpi_intervals) - set(cfg.intervals))
    if missing:  # an MPI row is only worth its inline twin: same interval, same everything else
        raise ConfigError(f"bench staleness: --mpi-intervals {_label(missing[0])} is not one of --intervals")
    for row in rows_of(cfg):  # a wrong --set stops here, in one line, not in the first row's subprocess
        apply_overrides(get_recipe(cfg.recipe), _row_sets(cfg, row))
    return cfg


@dataclass(frozen=True)
class Row:
    every: int  # refresh.every; 0 = never
    mode: str  # inline | mpi

    @property
    def name(self) -> str:
        return f"{_label(self.every, 'every')}-{self.mode}"


def _label(every: int, prefix: str = "") -> str:
    return "never" if every == 0 else f"{prefix}{every}"


def rows_of(cfg: StalenessBench) -> list[Row]:
    return [Row(e, "inline") for e in cfg.intervals] + [Row(e, "mpi") for e in cfg.mpi_intervals]


# ---------------------------------------------------------------------------------------------------- running rows

def _row_sets(cfg: StalenessBench, row: Row) -> list[str]:
    # closed-book: the same reader with retrieval off, whatever the refresh; trained once per run, not per row
    return [*cfg.overrides, "eval.closed_book_baseline=false", f"refresh.mode={row.mode}", f"refresh.every={row.every}"]


def _mpiexec() -> str:
    found = VENV_BIN / "mpiexec" if (VENV_BIN / "mpiexec").exists() else shutil.which("mpiexec")
    if found is None:
        raise ConfigError("bench staleness: an MPI row needs mpiexec (pip install mpich mpi4py); "
                          "--mpi-intervals with no value drops it")
    return str(found)


def _command(cfg: StalenessBench, row: Row, run_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "realm_hpc", "pretrain", "--recipe", cfg.recipe, "--out", str(run_dir)]
    cmd += [x for s in _row_sets(cfg, row) for x in ("--set", s)] + (["--resume"] if resume else [])
    if row.mode == "mpi":
        cmd = [_mpiexec(), "-n", "2", *cmd, "--refreshers", "1"]
    return cmd


def _env() -> dict:
    """The bench's own environment, its checkout first on the path: every row imports the code that runs the bench."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # mpiexec's proxies live beside it
    return env


def run_row(cfg: StalenessBench, row: Row, out: Path) -> tuple[dict, str]:
    """(summary, what happened: 'reused' | 'ran' | 'resumed') of one row, run as a subprocess unless finished."""
    run_dir = out / row.name
    spec = {"recipe": cfg.recipe, "mode": row.mode, "overrides": _row_sets(cfg, row)}
    if (run_dir / ROW_SPEC).exists():
        old = json.loads((run_dir / ROW_SPEC).read_text())
        if old != spec:
            changed = sorted(set(map(str, [old["recipe"], *old["overrides"]])) ^ {cfg.recipe, *spec["overrides"]})
            raise ConfigError(f"{run_dir}: a row started with other settings (differing: {', '.join(changed)}); "
                              "use another --out or delete it")
        if (run_dir / "summary.json").exists():
            return json.loads((run_dir / "summary.json").read_text()), "reused"
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: not a row of bench staleness (no {ROW_SPEC}); use another --out")
    resume = (run_dir / "config.json").exists()
    atomic_write_json(run_dir / ROW_SPEC, spec)
    cmd = _command(cfg, row, run_dir, resume)
    print(f"row {row.name}: {'resuming' if resume else 'running'} ({run_dir / ROW_LOG})", flush=True)
    t0 = time.perf_counter()
    with open(run_dir / ROW_LOG, "a") as log:  # a resumed row's log keeps the killed attempt's lines
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()).returncode
    if rc != 0 or not (run_dir / "summary.json").exists():
        raise RuntimeError(f"bench staleness: row {row.name} failed (exit {rc}): {_last_error(run_dir / ROW_LOG)}; "
                           f"log: {run_dir / ROW_LOG}")
    print(f"row {row.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((run_dir / "summary.json").read_text()), "resumed" if resume else "ran"


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error", "Traceback")) or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


# ------------------------------------------------------------------------------------------------------ the table

def span_hits(run_dir: Path) -> torch.Tensor | None:
    """A finished row's hits per test span (what the Pretrainer saved); None for a run finished by older code."""
    path = run_dir / SPAN_HITS_FILE
    return torch.from_numpy(np.load(path)) if path.exists() else None


def final(summary: dict, key: str):
    """A final number of a run: the test split's (read at the end only). The one place the bench reads them."""
    return summary[f"test_{key}"]


def table_row(row: Row, summary: dict, status: str) -> dict:
    k = summary["k"]
    loop_s = summary.get("realm_loop_s")
    return dict(row=row.name, mode=row.mode, refresh_every=row.every, interval=_label(row.every),
                recall_at_k=final(summary, f"recall_at_{k}"), mlm_acc=final(summary, "mlm_acc_retrieval"),
                mean_staleness=summary.get("mean_staleness_steps"), max_staleness=summary["max_staleness_steps"],
                index_versions=summary["index_versions"], steps=summary["steps"],
                steps_per_s=summary.get("realm_steps_per_s"), wait_s=summary["trainer_wait_s"],
                wait_share=summary["trainer_wait_s"] / loop_s if loop_s else None,
                dev_recall_after_ict=summary[f"dev_recall_at_{k}_after_ict"], wall_s=summary["wall_s"], status=status)


def add_paired(rows: list[dict], out: Path) -> str | None:
    """Each row's span accuracy, and its spans against the most frequent inline refresh's (the base); returns the
    base row's name."""
    spans = {r["row"]: span_hits(out / r["row"]) for r in rows}
    for r in rows:
        r["mlm_span_acc"] = None if spans[r["row"]] is None else share(spans[r["row"]])
    inline = [r for r in rows if r["mode"] == "inline"]
    refreshed = [r for r in inline if r["refresh_every"] > 0] or inline
    if not refreshed:
        return None
    base = min(refreshed, key=lambda r: r["refresh_every"])
    for r in rows:
        a, b = spans[r["row"]], spans[base["row"]]
        if r is not base and a is not None and b is not None:
            # the bench's one paired comparison: spans, each an independent trial (evaluate.per_example)
            r["mlm_spans_only_row_right"], r["mlm_spans_only_base_right"], r["mlm_vs_base_p"] = paired_sign_test(a, b)
            r["vs_base"] = f"+{r['mlm_spans_only_row_right']}/-{r['mlm_spans_only_base_right']}"
    return base["row"]


def direction(rows: list[dict]) -> dict:
    """Whether this measurement follows the seed's ablation: inline rows ordered from the freshest index (lowest
    mean staleness) to the stalest, recall@k and MLM accuracy never rising; the never-refreshed row lowest; and
    the MPI row against its inline twin (same interval): accuracy and steps/s."""
    inline = sorted((r for r in rows if r["mode"] == "inline"), key=lambda r: r["mean_staleness"] or 0.0)
    out: dict = {"order": [r["row"] for r in inline]}
    for key in ("recall_at_k", "mlm_acc"):
        values = [r[key] for r in inline]
        out[f"{key}_falls_with_staleness"] = all(a >= b for a, b in zip(values, values[1:]))
        never = [r[key] for r in inline if r["refresh_every"] == 0]
        if never and len(inline) > 1:
            out[f"{key}_never_lowest"] = never[0] <= min(r[key] for r in inline if r["refresh_every"])
    twins = {r["refresh_every"]: r for r in inline}
    out["mpi_vs_inline"] = [
        dict(interval=m["interval"], recall_delta=m["recall_at_k"] - twins[m["refresh_every"]]["recall_at_k"],
             mlm_delta=m["mlm_acc"] - twins[m["refresh_every"]]["mlm_acc"],
             steps_per_s_ratio=_ratio(m["steps_per_s"], twins[m["refresh_every"]]["steps_per_s"]))
        for m in rows if m["mode"] == "mpi" and m["refresh_every"] in twins]
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def plot(rows: list[dict], k: int, path: Path) -> None:
    """recall@k and MLM accuracy against refresh.every (log axis, 'never' at the right end), steps/s on a second
    axis; inline rows as lines, MPI rows as open markers at their interval."""
    plt = utils.pyplot()
    finite = sorted({r["refresh_every"] for r in rows if r["refresh_every"] > 0})
    never_x = max(finite) * 4 if finite else 1

    def x(r):
        return r["refresh_every"] or never_x

    fig, ax = plt.subplots(figsize=(7, 4.8))
    speed = ax.twinx()
    for mode, style in (("inline", dict(linestyle="-")), ("mpi", dict(linestyle="none", markerfacecolor="none"))):
        part = sorted((r for r in rows if r["mode"] == mode), key=x)
        if not part:
            continue
        xs = [x(r) for r in part]
        ax.plot(xs, [r["recall_at_k"] for r in part], marker="o", color="tab:blue", label=f"recall@{k} ({mode})",
                **style)
        ax.plot(xs, [r["mlm_acc"] for r in part], marker="s", color="tab:green", label=f"MLM accuracy ({mode})",
                **style)
        speed.plot(xs, [r["steps_per_s"] or float("nan") for r in part], marker="^", color="tab:red",
                   label=f"steps/s ({mode})", **{**style, "linestyle": ":" if mode == "inline" else "none"})
    ax.set_xscale("log")
    ticks = [*finite, *([never_x] if any(r["refresh_every"] == 0 for r in rows) else [])]
    ax.set_xticks(ticks, [str(t) for t in finite] + (["never"] if len(ticks) > len(finite) else []))
    ax.minorticks_off()
    ax.set_xlabel("refresh.every (steps between index refreshes)")
    ax.set_ylabel(f"held-out recall@{k} / MLM accuracy")
    ax.set_ylim(0, 1.02)
    speed.set_ylabel("REALM steps/s", color="tab:red")
    speed.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = speed.get_legend_handles_labels()
    # below the axes: the lines span the whole plot
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=3, frameon=False)
    ax.set_title("What a stale index costs (same seed and data per row)")
    fig.tight_layout()
    utils.save_figure(fig, path)


COLUMNS = [("row", "{}"), ("interval", "{}"), ("recall_at_k", "{:.3f}"), ("mlm_acc", "{:.3f}"),
           ("mlm_span_acc", "{:.3f}"), ("vs_base", "{}"),
           ("mlm_vs_base_p", "{:.3g}"), ("mean_staleness", "{:.1f}"), ("max_staleness", "{}"),
           ("index_versions", "{}"), ("steps_per_s", "{:.2f}"), ("wait_share", "{:.3f}"), ("wall_s", "{:.0f}")]


def run(cfg: StalenessBench) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    meta = utils.run_meta(torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                          packages=("torch", "numpy", "transformers", "mpi4py"))
    meta["config"] = dataclasses.asdict(cfg)
    plan = rows_of(cfg)
    print(f"{meta['device']}  sha {meta['git_sha']}  recipe {cfg.recipe}: {len(plan)} rows "
          f"({', '.join(r.name for r in plan)}) in {out}", flush=True)
    rows, k = [], None
    for row in plan:
        summary, status = run_row(cfg, row, out)
        k = summary["k"]
        rows.append(table_row(row, summary, status))
    meta["k"], meta["recipe"], meta["wall_s"] = k, cfg.recipe, time.perf_counter() - t_start
    meta["rows_wall_s"] = sum(r["wall_s"] for r in rows)  # the rows' own runs, killed attempts included
    base = add_paired(rows, out)
    result = dict(meta=meta, rows=rows, paired_base=base, direction=direction(rows))
    utils.write_results(out, result, COLUMNS)
    plot(rows, k, out / "staleness.png")
    print(f"\ntest split. recall_at_k: recall@{k}; mlm_acc: per masked token, mlm_span_acc: per masked span (all its "
          f"tokens right); vs_base: spans only this row / only {base} gets right (McNemar's exact p)\n")
    print(utils.markdown(rows, COLUMNS))
    d = result["direction"]
    print(f"\nstaler -> lower: recall@{k} {_yes(d['recall_at_k_falls_with_staleness'])}, MLM accuracy "
          f"{_yes(d['mlm_acc_falls_with_staleness'])}" + (
              f"; never lowest: recall@{k} {_yes(d['recall_at_k_never_lowest'])}, MLM {_yes(d['mlm_acc_never_lowest'])}"
              if "recall_at_k_never_lowest" in d else ""))
    for m in d["mpi_vs_inline"]:
        ratio = "-" if m["steps_per_s_ratio"] is None else f"x{m['steps_per_s_ratio']:.2f}"
        print(f"mpi vs inline at {m['interval']}: recall@{k} {m['recall_delta']:+.3f}, MLM {m['mlm_delta']:+.3f}, "
              f"steps/s {ratio}")
    ran = sum(r["status"] != "reused" for r in rows)
    print(f"\n{ran} of {len(rows)} rows run now ({meta['wall_s']:.0f} s; the rows' own runs "
          f"{meta['rows_wall_s']:.0f} s); wrote {out}/results.json, results.csv, staleness.png")
    return result


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main(argv=None) -> None:
    from realm_hpc.cli import main as cli_main

    cli_main(["bench", "staleness", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
