"""`realm-hpc bench refresh` and `bench train-step` (quick, on a small world) write well-formed JSON and CSV and
print one Markdown table. No speed is asserted: only shape, fields and the arithmetic that ties them together."""

import contextlib
import csv
import io
import json

import pytest

from realm_hpc.cli import main

META_KEYS = {"machine", "cpu", "device", "git_sha", "time", "versions", "config", "model", "wall_s"}


def _run(args):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(args)
    return stdout.getvalue()


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sets(small_world):
    return [x for item in small_world for x in ("--set", item)]


def test_bench_refresh(tmp_path, small_world):
    out = tmp_path / "refresh"
    stdout = _run(["bench", "refresh", "--quick", "--docs", "40", "--batch-size", "16", "--repeats", "1",
                   "--out", str(out), *_sets(small_world)])
    result = json.loads((out / "results.json").read_text())
    assert META_KEYS <= set(result["meta"]) and result["goal"] == 0.9
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"refresher", "hf_forward"}
    for r in rows.values():
        assert (r["docs"], r["batch_size"]) == (40, 16)
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["docs_per_s"] == pytest.approx(40 / (r["p50_ms"] * 1e-3))
        assert r["tokens"] > r["docs"] and r["seq_len_max"] >= r["seq_len_mean"] > 0
    assert rows["hf_forward"]["ratio_vs_hf_forward"] == 1.0
    assert result["ratio"] == rows["refresher"]["ratio_vs_hf_forward"] == pytest.approx(
        rows["refresher"]["docs_per_s"] / rows["hf_forward"]["docs_per_s"])
    csv_rows = _csv(out / "results.csv")
    assert [r["method"] for r in csv_rows] == ["refresher", "hf_forward"]
    assert all(r["git_sha"] and r["device"] and r["time"] for r in csv_rows)
    assert float(csv_rows[0]["ratio_vs_hf_forward"]) == pytest.approx(result["ratio"])
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| method | docs | batch_size") and len(table) == 4
    assert "refresher / hf_forward =" in stdout


def test_bench_train_step(tmp_path, small_world):
    out = tmp_path / "train-step"
    stdout = _run(["bench", "train-step", "--quick", "--repeats", "4", "--out", str(out), *_sets(small_world),
                   "--set", "refresh.every=2", "--set", "train.batch_size=4"])
    result = json.loads((out / "results.json").read_text())
    assert META_KEYS <= set(result["meta"])
    assert result["meta"]["model"]["refresh_every"] == 2 and result["meta"]["model"]["batch_size"] == 4
    phases = [r["phase"] for r in result["rows"]]
    assert phases == ["index_swap", "index_wait", "data", "retrieve", "fwd_bwd", "optimizer", "total"]
    steps = result["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # after one untimed warm-up step
    assert result["swaps"] == sum(s["swapped"] for s in steps) == 2  # steps 2 and 4
    for s in steps:
        parts = sum(s[p] for p in phases[:-1])
        assert all(s[p] >= 0 for p in phases) and parts == pytest.approx(s["total"], rel=0.05, abs=1.0)
        assert (s["index_wait"] > 0) == s["swapped"]
    rows = {r["phase"]: r for r in result["rows"]}
    assert sum(rows[p]["share"] for p in phases[:-1]) == pytest.approx(1.0, rel=0.05)
    assert rows["total"]["share"] == 1.0 and rows["fwd_bwd"]["mean_ms"] > 0 and rows["retrieve"]["mean_ms"] > 0
    csv_rows = _csv(out / "results.csv")
    assert [r["phase"] for r in csv_rows] == phases and all(float(r["mean_ms"]) >= 0 for r in csv_rows)
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| phase | mean_ms") and len(table) == 2 + len(phases)


def test_bench_unknown_recipe_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train-step", "--quick", "--recipe", "nope", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "unknown recipe 'nope'" in capsys.readouterr().err


def test_bench_sbatch_is_a_thin_valid_script():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "slurm" / "bench.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert sbatch and max(sbatch) < first_command  # sbatch stops reading #SBATCH at the first command
    assert any("--output=logs/bench-%j.out" in lines[i] for i in sbatch)
    assert all(f"bench {name}" in script.read_text() for name in ("retrieval", "refresh", "train-step"))
