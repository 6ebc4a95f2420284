"""Re-encode throughput of the refresher path vs a bare HF forward loop on the same model, batches and lengths.

    realm-hpc bench refresh --quick                                  # tiny recipe, CPU, seconds
    realm-hpc bench refresh --recipe demo --docs 2048 --batch-size 128
    realm-hpc bench refresh --set model.pretrained=DIR               # a real BERT (e.g. all-MiniLM-L6-v2)

refresher: realm_hpc.retrieval.index.encode_blocks, the loop the inline refresh, the refresher ranks and
build-index run: gather each batch from the memory-mapped block store, doc encoder forward (BERT + pooling +
projection), float32 embeddings out. hf_forward: BertModel.forward of the same encoder under torch.no_grad over the
same batches, tokens already in tensors on the device (the lower bound of any refresher). The ratio (docs/s of the
refresher / docs/s of hf_forward, p50) says how much the refresher adds; the goal is >= 0.9.
Both methods are timed in interleaved rounds (bench.utils.time_interleaved; triton's do_bench on GPU).
Writes results.json, results.csv and one Markdown table on stdout. Not a test: no asserts.
"""

from __future__ import annotations

import dataclasses
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
from realm_hpc.models.encoders import Encoder  # noqa: E402
from realm_hpc.retrieval.index import encode_blocks  # noqa: E402

BASELINE = "hf_forward"
GOAL = 0.9


@dataclass(kw_only=True)
class RefreshBench:
    recipe: str = "tiny"
    overrides: list[str] = field(default_factory=list)  # --set key=value on the recipe
    docs: int = 2048  # documents re-encoded per timed pass (the first ones of the corpus)
    batch_size: int | None = None  # None = the recipe's refresh.batch_size
    repeats: int = 5  # minimum timing rounds
    max_repeats: int = 30
    min_time_s: float = 3.0
    device: str = "auto"
    out: str = "runs/bench/refresh"


def quick() -> RefreshBench:
    return RefreshBench(docs=256, batch_size=64, repeats=3, max_repeats=10, min_time_s=0.5)


def config(quick_run: bool = False, **overrides) -> RefreshBench:
    cfg = utils.with_overrides(quick() if quick_run else RefreshBench(), overrides, "refresh")
    if cfg.docs < 1 or (cfg.batch_size is not None and cfg.batch_size < 1) or cfg.repeats < 1:
        raise ValueError("bench refresh: --docs, --batch-size and --repeats must be positive")
    return cfg


def run(cfg: RefreshBench) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    mcfg, data = utils.recipe_data(cfg.recipe, cfg.overrides, out)
    torch.manual_seed(0)
    encoder = Encoder(mcfg.model, data.vocab_size, mcfg.model.block_len).to(device).eval()
    n = min(cfg.docs, len(data.blocks))
    bs = cfg.batch_size or mcfg.refresh.batch_size
    batches = [{k: v.to(device) for k, v in data.blocks.batch(range(a, min(n, a + bs))).items()}
               for a in range(0, n, bs)]

    def refresher():
        encode_blocks(encoder, data.blocks, bs, indices=range(0, n))

    @torch.no_grad()
    def hf_forward():
        for b in batches:
            encoder.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    meta = utils.run_meta(device, packages=("torch", "numpy", "transformers"))
    meta["config"] = dataclasses.asdict(cfg)
    meta["model"] = {"recipe": mcfg.recipe, "pretrained": mcfg.model.pretrained or "scratch",
                     "hidden": encoder.bert.config.hidden_size, "layers": encoder.bert.config.num_hidden_layers,
                     "params": sum(p.numel() for p in encoder.parameters())}
    print(f"{meta['device']}  sha {meta['git_sha']}  {n} docs, batch {bs}", flush=True)
    times = utils.time_interleaved({"refresher": refresher, BASELINE: hf_forward}, device,
                                   min_repeats=cfg.repeats, max_repeats=cfg.max_repeats, min_time_s=cfg.min_time_s)
    lengths = [b["input_ids"].shape[1] for b in batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    rows = []
    for method, (p20, p50, p80) in times.items():
        rows.append(dict(method=method, docs=n, batch_size=bs, seq_len_mean=float(np.mean(lengths)),
                         seq_len_max=max(lengths), tokens=tokens, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                         docs_per_s=n / (p50 * 1e-3), tokens_per_s=tokens / (p50 * 1e-3),
                         ratio_vs_hf_forward=times[BASELINE][1] / p50))
    meta["wall_s"] = time.perf_counter() - t_start
    result = dict(meta=meta, rows=rows, ratio=rows[0]["ratio_vs_hf_forward"], goal=GOAL)
    utils.write_results(out, result, COLUMNS)
    print("\n" + utils.markdown(rows, COLUMNS))
    print(f"\nrefresher / hf_forward = {result['ratio']:.3f} (goal >= {GOAL})")
    print(f"wrote {out}/results.json, results.csv in {meta['wall_s']:.1f} s")
    return result


COLUMNS = [("method", "{}"), ("docs", "{}"), ("batch_size", "{}"), ("seq_len_mean", "{:.1f}"),
           ("p50_ms", "{:.1f}"), ("p20_ms", "{:.1f}"), ("p80_ms", "{:.1f}"), ("docs_per_s", "{:,.1f}"),
           ("tokens_per_s", "{:,.0f}"), ("ratio_vs_hf_forward", "{:.3f}")]


def main(argv=None) -> None:
    from realm_hpc.cli import main as cli_main

    cli_main(["bench", "refresh", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
