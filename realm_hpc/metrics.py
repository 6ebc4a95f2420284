"""Training metrics: a JSONL file (the source of truth, one object per line), TensorBoard scalars beside it, and a
PNG of the curves. Only rank 0 logs; other ranks build a disabled logger so call sites need no rank checks.
TensorBoard and matplotlib only draw outputs: where one is not installed (a bare GPU image), its output is left out
with one warning line and training goes on."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from realm_hpc.checkpoint import atomic_write, atomic_write_text, json_safe

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def _json_value(v: Any) -> Any:
    # Tensors and numpy scalars arrive from training code; .item() turns them into Python numbers.
    if hasattr(v, "item"):
        v = v.item()
    return json_safe(v)  # null for NaN/inf keeps every line parseable by strict readers


def _tb_tag(key: str) -> str:
    return key if "/" in key else f"train/{key}"


def _parse_lines(path: Path) -> list[dict]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A crash mid-write can cut the last line short; anything else is real corruption.
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: malformed metrics line: {line[:80]!r}") from None
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics.jsonl (scalar rows and event rows), in file order. Accepts a run dir or the file."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return _parse_lines(path)


class MetricsLogger:
    """Appends `{"step": .., **scalars}` lines to run_dir/metrics.jsonl and mirrors numbers to TensorBoard.

    `resume_step`: when resuming from a checkpoint taken at that step, rows logged after it (by the run that
    crashed) are dropped first, so the file never holds a step twice. None appends to whatever is there.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [r for r in _parse_lines(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        # buffering=1: line-buffered, so a crash loses at most the line being written.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        # Imported here so disabled (non-zero) ranks never load TensorBoard. purge_step hides the crashed run's
        # events past the checkpoint, matching the JSONL truncation above.
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            print(f"warning: no TensorBoard events ({exc}); {METRICS_FILE} has every row", file=sys.stderr,
                  flush=True)
            return
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def log(self, step: int, **scalars: Any) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
        self._write(row)
        for k, v in scalars.items():
            v = v.item() if hasattr(v, "item") else v
            if self._tb is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(_tb_tag(k), v, int(step))

    def mark_event(self, step: int, name: str) -> None:
        """Record a point event (e.g. "refresh" when a new index version is swapped in)."""
        if not self.enabled:
            return
        self._write({"step": int(step), "event": name})
        if self._tb is not None:
            self._tb.add_text("events", name, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------


def _base(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _is_loss(key: str) -> bool:
    b = _base(key)
    return b == "loss" or b.startswith("loss_") or b.endswith("_loss")


_PANELS = [
    ("loss", _is_loss),
    # dev_recall_at_k / test_recall_at_k (and recall_at_k of older runs): one panel each, dev and test side by side
    ("recall@k", lambda k: _base(k).removeprefix("dev_").removeprefix("test_").startswith("recall_at")),
    ("MLM accuracy", lambda k: _base(k).removeprefix("dev_").removeprefix("test_").startswith("mlm_acc")),
]
_SYSTEM_KEYS = ("staleness", "wait_s")
_FEW_POINTS = 30  # a series with at most this many points is drawn with a marker on each


def _numeric_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _refresh_steps(rows: list[dict]) -> list[int]:
    steps, version = set(), None
    for r in rows:
        if r.get("event") == "refresh":
            steps.add(r["step"])
        v = r.get("index_version")
        if v is not None:
            if version is not None and v != version:
                steps.add(r["step"])
            version = v
    return sorted(steps)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        if key in r:
            xs.append(r["step"])
            # null (was NaN/inf) becomes a gap in the line rather than a dropped point joining its neighbours.
            ys.append(float("nan") if r[key] is None else r[key])
    return xs, ys


def _lone(ys: list[float]) -> list[bool]:
    """Points with no finite neighbour: a line through them draws nothing, a marker shows them."""
    ok = [math.isfinite(y) for y in ys]
    return [ok[i] and not (i > 0 and ok[i - 1]) and not (i + 1 < len(ok) and ok[i + 1]) for i in range(len(ok))]


def plot_curves(run_dir: str | os.PathLike) -> Path | None:
    """Write run_dir/curves.png (atomically) from run_dir/metrics.jsonl. Returns the PNG path, or None (one warning
    line) where matplotlib is not installed."""
    run_dir = Path(run_dir)
    fig = curves_figure(read_metrics(run_dir / METRICS_FILE))
    if fig is None:
        return None
    return atomic_write(run_dir / CURVES_FILE, lambda f: fig.savefig(f, format="png", dpi=100))


def curves_figure(rows: list[dict]):
    """The figure of curves.png from metrics rows: loss, recall@k and MLM accuracy panels (and staleness / wait),
    refreshes marked; None (one warning line) where matplotlib is not installed. Series of evaluations (a few
    points) are drawn with markers, so a lone point shows."""
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak in long runs.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        print(f"warning: no {CURVES_FILE} ({exc}); {METRICS_FILE} has the curves' data", file=sys.stderr, flush=True)
        return None

    scalar_rows = [r for r in rows if "event" not in r]
    keys = list(dict.fromkeys(k for r in scalar_rows for k, v in r.items() if k != "step" and _numeric_or_none(v)))
    panels = [(title, [k for k in keys if match(k)]) for title, match in _PANELS]
    system = [k for k in keys if _base(k) in _SYSTEM_KEYS]
    if system:
        panels.append(("staleness / wait", system))
    refresh = _refresh_steps(rows)

    # Empty panels stay (so every run's PNG has the same layout) but shrink; the system panel is a small strip.
    ratios = [3 if ks else 0.6 for _, ks in panels[: len(_PANELS)]] + ([1.5] if system else [])
    fig = Figure(figsize=(8, sum(ratios) * 0.9 + 1))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    for ax, (title, panel_keys) in zip(axes, panels):
        ax.set_title(title, fontsize=9, loc="left")
        if not panel_keys:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_yticks([])
            continue
        lines = []
        for i, k in enumerate(panel_keys):
            # Seconds and steps-behind differ by orders of magnitude: wait_s gets its own y axis on the right.
            target = ax.twinx() if _base(k) == "wait_s" and len(panel_keys) > 1 else ax
            xs, ys = _series(scalar_rows, k)
            # An evaluation series has a handful of points (start, every train.eval_every, end): markers on all of
            # them; a long series (the loss) keeps a plain line, with markers only where a point stands alone.
            few = len(xs) <= _FEW_POINTS
            lines += target.plot(xs, ys, label=k, lw=1, color=f"C{i}", marker="o", ms=3,
                                 markevery=None if few else [j for j, lone in enumerate(_lone(ys)) if lone])
        for s in refresh:
            ax.axvline(s, ls="--", lw=0.7, color="gray", alpha=0.7)
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step" + ("  (dashed: index refresh)" if refresh else ""))
    fig.tight_layout()
    return fig


def format_summary(summary: dict) -> str:
    """A run's summary.json as the aligned table `pretrain`, `finetune` and `evaluate` print."""
    width = max(len(k) for k in summary)
    lines = ["", "summary", "-" * (width + 14)]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
