"""`realm-hpc bench retrieval --quick` (in-process, shrunk further by flags) writes well-formed JSON, CSV and PNGs
and prints one Markdown table. No speed is asserted: only shape, fields and the exact backends' recall."""

import contextlib
import csv
import io
import json

import pytest

from realm_hpc.cli import main

pytest.importorskip("faiss")

ARGS = ["bench", "retrieval", "--quick", "--n", "3000", "--dim", "32", "--batch-sizes", "1", "8",
        "--nprobe", "2", "4", "--dtype", "fp32", "bf16", "--repeats", "1"]
META_KEYS = {"machine", "cpu", "device", "git_sha", "time", "versions", "copy_gbs", "peak_memory", "wall_s"}
ROW_KEYS = {"backend", "setting", "dtype", "N", "D", "B", "k", "p20_ms", "p50_ms", "p80_ms", "qps", "recall",
            "bytes_per_query", "gbs", "frac_bw", "search_peak_mb", "build_s", "build_peak_mb", "index_mb",
            "speedup_vs_faiss-flat", "speedup_vs_torch", "params"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main([*ARGS, "--out", str(out)])
    return out, stdout.getvalue()


def test_json(bench_run):
    out, _ = bench_run
    result = json.loads((out / "results.json").read_text())
    assert META_KEYS <= set(result["meta"])
    assert {"torch", "numpy", "python"} <= set(result["meta"]["versions"])
    rows = result["rows"]
    # fp32: exact + torch + faiss-flat + 2 IVF-PQ settings; bf16: exact + torch; at B = 1 and 8
    assert len(rows) == 2 * (1 + 1 + 1 + 2) + 2 * 2
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert {(s["backend"], s["dtype"]) for s in result["skipped"]} == {("faiss-flat", "bf16"),
                                                                      ("faiss-ivfpq", "bf16")}
    for r in rows:
        assert (r["N"], r["D"], r["k"]) == (3000, 32, 8)
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["qps"] > 0 and r["bytes_per_query"] > 0
        assert 0.0 <= r["recall"] <= 1.0
        if r["backend"] in ("exact", "torch", "faiss-flat") and r["dtype"] == "fp32":
            assert r["recall"] == 1.0
        if r["backend"] == "faiss-ivfpq":
            assert r["setting"] in ("nprobe=2", "nprobe=4") and r["build_s"] > 0
            assert json.loads(r["params"])["nprobe"] == int(r["setting"].split("=")[1])
    assert {r["speedup_vs_faiss-flat"] for r in rows if r["backend"] == "faiss-flat"} == {1.0}
    assert {r["speedup_vs_torch"] for r in rows if r["backend"] == "torch"} == {1.0}


def test_csv(bench_run):
    out, _ = bench_run
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14
    assert {"time", "machine", "device", "git_sha", "versions"} <= set(rows[0])
    for r in rows:
        float(r["p50_ms"]), float(r["qps"]), float(r["recall"]), int(r["B"])
        assert r["git_sha"] and r["device"]


def test_pngs(bench_run):
    import matplotlib.image

    out, _ = bench_run
    for name in ("qps_vs_b.png", "recall_vs_qps.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out / name).ndim == 3


def test_markdown_table_on_stdout(bench_run):
    _, stdout = bench_run
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| backend | setting | dtype | N | D | B | p50_ms")
    assert len(table) == 2 + 14


def test_unknown_backend_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "retrieval", "--quick", "--backends", "hnsw", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown backend 'hnsw'" in capsys.readouterr().err


def test_saved_index_is_benchmarked(tiny_run, tmp_path):
    """--index: a directory realm-hpc build-index wrote (bf16 storage: the bench searches it as fp32)."""
    index = tmp_path / "index"
    main(["build-index", "--run", str(tiny_run), "--out", str(index), "--dtype", "bf16"])
    meta = json.loads((index / "meta.json").read_text())
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["bench", "retrieval", "--quick", "--index", str(index), "--backends", "exact", "faiss-flat",
              "--batch-sizes", "4", "--repeats", "1", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    n, d = meta["count"], meta["dim"]
    assert [(r["backend"], r["N"], r["D"], r["B"], r["recall"]) for r in rows] == [
        ("exact", n, d, 4, 1.0), ("faiss-flat", n, d, 4, 1.0)]
