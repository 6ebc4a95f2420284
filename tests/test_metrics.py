import json
import os

import numpy as np
import pytest
import torch

from realm_hpc.metrics import MetricsLogger, curves_figure, plot_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rows_are_well_formed_and_nan_is_null(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(0, loss=1.5, lr=1e-3, tokens=128)
        log.log(1, loss=float("nan"), grad_norm=float("inf"), acc=np.float32(0.5), t=torch.tensor(2.0))
        log.mark_event(1, "refresh")
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = _lines(tmp_path)  # strict json.loads on every line
    assert rows[0] == {"step": 0, "loss": 1.5, "lr": 1e-3, "tokens": 128}
    assert isinstance(rows[0]["tokens"], int) and isinstance(rows[0]["loss"], float)
    assert rows[1] == {"step": 1, "loss": None, "grad_norm": None, "acc": 0.5, "t": 2.0}
    assert isinstance(rows[1]["t"], float)
    assert rows[2] == {"step": 1, "event": "refresh"}
    assert read_metrics(tmp_path / "metrics.jsonl") == rows


def test_each_line_is_on_disk_before_close(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(3, loss=2.0)
    assert _lines(tmp_path) == [{"step": 3, "loss": 2.0}]  # a crash now loses nothing
    log.close()


def test_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        log.log(0, loss=1.0, **{"eval/recall_at_5": 0.25})
        log.log(1, loss=0.5)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "eval/recall_at_5"}
    assert [e.value for e in acc.Scalars("train/loss")] == [1.0, 0.5]


def test_resume_drops_rows_after_resume_step(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for s in range(10):
            log.log(s, loss=float(s))
        log.mark_event(7, "refresh")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # the crashed run died mid-line
    with MetricsLogger(tmp_path, resume_step=4) as log:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
        for s in range(5, 8):
            log.log(s, loss=float(s))
    steps = [r["step"] for r in _lines(tmp_path)]
    assert steps == list(range(8))
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{oops\n{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    log = MetricsLogger(run, enabled=False, resume_step=3)
    log.log(0, loss=1.0)
    log.mark_event(0, "refresh")
    log.close()
    assert not run.exists()


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert sorted(p for p in os.listdir(path.parent) if p.startswith(".")) == []  # no temp left


def test_plot_curves_with_recall_events_and_system_panel(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for s in range(20):
            log.log(s, loss=3.0 / (s + 1), mlm_acc=s / 20, index_version=s // 8, staleness=s % 8, wait_s=0.01)
            if s % 5 == 0:
                log.log(s, **{"eval/recall_at_5": s / 20, "eval/recall_at_20": s / 10})
        log.log(20, loss=float("nan"))
        log.mark_event(10, "refresh")
    _assert_png(plot_curves(tmp_path))


def test_plot_curves_without_recall(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for s in range(5):
            log.log(s, loss=1.0 / (s + 1))
    path = plot_curves(tmp_path)
    assert path == tmp_path / "curves.png"
    _assert_png(path)
    first = path.read_bytes()
    plot_curves(tmp_path)  # overwrite in place
    _assert_png(path)
    assert path.read_bytes() == first  # same data, same picture


def test_plot_curves_empty_file(tmp_path):
    MetricsLogger(tmp_path).close()
    _assert_png(plot_curves(tmp_path))


def test_lone_points_are_drawn_as_markers(tmp_path):
    """A run evaluated once (the wiki run's MLM accuracy) or a point standing between gaps: a line of one point draws
    nothing, so evaluation series carry markers, and a long series marks its lone points."""
    with MetricsLogger(tmp_path) as log:
        for s in range(60):
            log.log(s, loss=float("nan") if s in (40, 42) else 1.0 / (s + 1))  # step 41 stands alone
        log.log(0, dev_recall_at_k=0.1, dev_recall_at_1=0.05)
        log.log(59, dev_recall_at_k=0.2, dev_recall_at_1=0.1, test_mlm_acc=0.06)  # one MLM evaluation
    fig = curves_figure(read_metrics(tmp_path))
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    mlm = lines["test_mlm_acc"]
    assert list(mlm.get_xdata()) == [59] and mlm.get_marker() == "o"
    assert lines["dev_recall_at_k"].get_marker() == "o" and lines["dev_recall_at_1"].get_marker() == "o"
    loss = lines["loss"]
    assert loss.get_marker() == "o" and loss.get_markevery() == [41]  # markers on the lone point only
    _assert_png(plot_curves(tmp_path))
