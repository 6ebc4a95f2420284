"""bench/bench_head.py at toy sizes writes results.json/csv with a naive and a chunked row per dtype. No speed or
peak-memory ratio is asserted (both depend on the machine); the saved-for-backward bytes are exact, so they are."""

import contextlib
import csv
import io
import json

from bench.bench_head import main


def test_bench_head_writes_rows(tmp_path):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["--out", str(tmp_path), "--rows", "32", "--tokens", "4", "--vocab", "257", "--hidden", "16",
              "--dtypes", "fp32", "bf16", "--chunk-sizes", "0", "50", "--repeats", "1", "--memory-repeats", "1"])
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert [(r["method"], r["dtype"], r["chunk"]) for r in rows] == [
        (m, d, c) for d in ("fp32", "bf16") for m, c in (("naive", "-"), ("chunked", "257 (auto)"), ("chunked", "50"))]
    assert result["meta"]["memory_method"] .startswith(("mem_tracker", "cuda"))
    for r in rows:
        assert r["p50_ms"] > 0 and r["grads_mb"] > 0 and r["peak_mb"] >= r["grads_mb"] * 0.99
        size = 4 if r["dtype"] == "fp32" else 2
        # naive keeps the float32 log-softmax [rows, V] (bf16: also the bf16 logits it was cast from)
        want = 32 * 257 * 4 if r["method"] == "naive" else 32 * 4  # chunked: one float32 lse per row
        assert r["saved_mb"] * 2**20 >= want and (r["method"] == "naive" or r["saved_mb"] * 2**20 < 32 * 257 * size)
    with open(tmp_path / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "| naive | fp32 |" in stdout.getvalue()
