"""`realm-hpc bench staleness` on a cut-down tiny recipe: refresh every 4 steps and never, inline, plus the MPI
refresher at 4 (where mpiexec is installed). Checks the rows against their runs, the files, that a second invocation
reruns nothing, that a row killed after its last checkpoint resumes, and what `refresh.every=0` (never) means.
No speed or accuracy is asserted: on a world this small both are noise.
"""

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch

from bench import bench_staleness
from realm_hpc.cli import main
from realm_hpc.config import ConfigError, apply_overrides
from realm_hpc.evaluate import paired_sign_test
from realm_hpc.recipes import get_recipe
from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex
from realm_hpc.retrieval.refresh import InlineRefresher, MPIRefresher

STEPS = 12
SMALL = ["ict.steps=10", "ict.eval_every=10", f"train.steps={STEPS}", "train.reader_warmup_steps=4",
         "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000", "train.device=cpu",
         "data.world_people=60", "data.world_orgs=12", "data.world_cities=8", "data.world_surnames=10",
         "data.heldout_facts=20", "data.eval_examples=20"]
MPI = bench_staleness.VENV_BIN.joinpath("mpiexec").exists() or shutil.which("mpiexec") is not None
MPI_INTERVALS = ["4"] if MPI else []
ROWS = ["every4-inline", "never-inline"] + ["every4-mpi"] * MPI


def _bench(out, *extra) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["bench", "staleness", "--recipe", "tiny", *[x for s in SMALL for x in ("--set", s)],
              "--intervals", "4", "never", "--mpi-intervals", *MPI_INTERVALS, "--out", str(out), *extra])
    return stdout.getvalue()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("staleness")
    return out, _bench(out)


def test_rows_are_the_runs(sweep):
    out, _ = sweep
    result = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    assert result["paired_base"] == "every4-inline" and result["meta"]["k"] == 8
    for name, r in rows.items():
        summary = json.loads((out / name / "summary.json").read_text())
        config = json.loads((out / name / "config.json").read_text())
        assert summary["steps"] == r["steps"] == STEPS and r["status"] == "ran"
        final = bench_staleness.final
        assert (r["recall_at_k"], r["mlm_acc"]) == (final(summary, "recall_at_8"), final(summary, "mlm_acc_retrieval"))
        assert config["refresh"]["every"] == r["refresh_every"] and config["refresh"]["mode"] == r["mode"]
        assert summary["refresh_mode"] == r["mode"] and not config["eval"]["closed_book_baseline"]
        assert r["steps_per_s"] == pytest.approx(STEPS / summary["realm_loop_s"])
        assert 0.0 <= r["wait_share"] < 1.0 and r["wall_s"] > 0
        assert 1 <= r["mean_staleness"] <= r["max_staleness"]
    # Inline every 4 steps: versions 1 (after ICT) + refreshes at steps 4 and 8; staleness 1..4 after each step.
    every4 = rows["every4-inline"]
    assert (every4["index_versions"], every4["max_staleness"], every4["mean_staleness"]) == (3, 4, 2.5)
    # Never: the index built after ICT serves all 12 steps; its staleness is 1..12 and the trainer never waits.
    never = rows["never-inline"]
    assert (never["index_versions"], never["max_staleness"], never["mean_staleness"]) == (1, STEPS, 6.5)
    assert never["wait_s"] == 0.0
    if MPI:  # a refresher rank's versions land when they land: at most one per 4 steps after the first send
        assert 1 <= rows["every4-mpi"]["index_versions"] <= 3


def test_paired_comparison_is_on_the_rows_test_spans(sweep):
    out, _ = sweep
    rows = json.loads((out / "results.json").read_text())["rows"]
    base = torch.from_numpy(np.load(out / "every4-inline" / "mlm_span_hits.npy"))
    for r in rows:
        spans = torch.from_numpy(np.load(out / r["row"] / "mlm_span_hits.npy"))
        summary = json.loads((out / r["row"] / "summary.json").read_text())
        assert spans.dtype == torch.bool and len(spans) == len(base) == summary["test_examples"]
        assert r["mlm_span_acc"] == pytest.approx(spans.float().mean().item())
        if r["row"] != "every4-inline":
            assert (r["mlm_spans_only_row_right"], r["mlm_spans_only_base_right"],
                    r["mlm_vs_base_p"]) == paired_sign_test(spans, base)
    assert "mlm_vs_base_p" not in rows[0]


def test_files_and_table(sweep):
    import matplotlib.image

    out, stdout = sweep
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ROWS
    assert all(r["git_sha"] and r["machine"] and r["time"] for r in rows)
    assert (out / "staleness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out / "staleness.png").ndim == 3
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| row | interval | recall_at_k | mlm_acc | mlm_span_acc | vs_base")
    assert len(table) == 2 + len(ROWS)
    direction = json.loads((out / "results.json").read_text())["direction"]
    assert direction["order"] == ["every4-inline", "never-inline"]  # by mean staleness
    assert isinstance(direction["recall_at_k_never_lowest"], bool)
    assert len(direction["mpi_vs_inline"]) == int(MPI)


def test_second_invocation_reruns_nothing(sweep):
    out, _ = sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*") if p.is_file()}
    first = json.loads((out / "results.json").read_text())["rows"]
    stdout = _bench(out)
    assert "running" not in stdout and "resuming" not in stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*") if p.is_file()} == before
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in again] == ["reused"] * len(ROWS)
    assert [{**r, "status": None} for r in again] == [{**r, "status": None} for r in first]


def test_killed_row_resumes_from_its_checkpoint(sweep):
    """A row stopped after its last checkpoint but before its summary: the rerun continues it with --resume (no
    step is trained again) and only it."""
    out, _ = sweep
    row = out / "never-inline"
    summary = json.loads((row / "summary.json").read_text())
    (row / "summary.json").unlink()
    stdout = _bench(out)
    assert "row never-inline: resuming" in stdout and stdout.count("resuming") == 1 and "running" not in stdout
    assert f"resuming at step {STEPS}" in (row / "pretrain.log").read_text()
    rows = {r["row"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["never-inline"]["status"] == "resumed"
    again = json.loads((row / "summary.json").read_text())
    for key in ("steps", "index_versions", "max_staleness_steps", "mean_staleness_steps", "realm_loop_s"):
        assert again[key] == summary[key], key
    for key in ("recall_at_8", "mlm_acc_retrieval"):
        assert bench_staleness.final(again, key) == bench_staleness.final(summary, key), key


def test_other_settings_in_the_same_out_are_an_error(sweep, capsys):
    out, _ = sweep
    with pytest.raises(SystemExit) as exc:
        _bench(out, "--set", "train.steps=13")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "a row started with other settings (differing: train.steps=13)" in err


def test_unknown_key_stops_before_any_row(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "staleness", "--recipe", "tiny", "--set", "refresh.evry=3", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown config key 'refresh.evry'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--intervals", "4", "4"], "distinct refresh intervals"),
    (["--intervals", "4", "never", "--mpi-intervals", "8"], "--mpi-intervals 8 is not one of --intervals"),
])
def test_bad_intervals_are_one_line_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "staleness", "--recipe", "tiny", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# -- refresh.every=0: never ----------------------------------------------------------------------------------------
def test_refresh_every_zero_is_never_and_negative_is_an_error():
    assert apply_overrides(get_recipe("tiny"), ["refresh.every=0"]).refresh.every == 0
    with pytest.raises(ConfigError, match="refresh.every must be >= 0"):
        apply_overrides(get_recipe("tiny"), ["refresh.every=-1"])


def test_inline_refresher_never_refreshes_at_zero():
    class Blocks:  # re-encoding would need a corpus; never must not touch it
        def __len__(self):
            raise AssertionError("refresh.every=0 re-encoded the corpus")

    live = LiveIndex(IndexSnapshot(torch.zeros(3, 2), version=1, weights_step=0))
    refresher = InlineRefresher(Blocks(), every=0, batch_size=8)
    assert not any(refresher.step_boundary(step, None, live).swapped for step in range(200))
    assert live.version == 1


class _SilentComm:
    """A communicator whose refreshers never answer: enough to drive MPIRefresher.maybe_send without MPI."""

    class _Pending:
        def Test(self):
            return False

    def send(self, *args, **kwargs):
        pass

    def irecv(self, *args, **kwargs):
        return self._Pending()


@pytest.mark.parametrize("every,sends", [(0, False), (5, True)])
def test_mpi_refresher_sends_nothing_at_zero(every, sends):
    refresher = MPIRefresher(_SilentComm(), [1], n_docs=3, dim=2, every=every, run_dir=".")
    try:
        assert refresher.maybe_send(400, torch.nn.Linear(2, 2), version=1, weights_step=0) is sends
    finally:
        refresher._abandon.set()  # the comm thread leaves its wait for the silent refresher
        refresher._thread.join(timeout=5)
    assert not refresher._thread.is_alive()
