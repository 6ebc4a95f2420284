"""Where a REALM training step's time goes: retrieve / fwd+bwd / optimizer / index swap / wait.

    realm-hpc bench train-step --quick                        # tiny recipe, CPU, seconds
    realm-hpc bench train-step --recipe demo --repeats 50     # the demo's model and corpus
    realm-hpc bench train-step --set refresh.every=10 --set train.batch_size=32

The step is Pretrainer.realm's REALM step (realm_hpc/train.py), built from the same pieces (Realm, build_optimizer,
fresh_index, InlineRefresher) and timed phase by phase, the retriever trained (no reader warm-up):
- index: refresher.step_boundary; ``wait`` is the time it blocked on a re-encode (event.wait_s: the whole
  re-encode with the inline refresher, ~0 with refresher ranks), ``swap`` the rest (taking the new index);
- data: the step's batch (masking, collation);
- retrieve: the MIPS over the stale index (LiveIndex.search through a timing proxy), exclusion included;
- fwd_bwd: the REALM forward less the search (query encoder, re-encode of the retrieved docs, reader inputs, reader,
  marginal) and the backward;
- optimizer: gradient clipping, AdamW step, LR schedule, zero_grad.
The trainer's device is the recipe's train.device (auto: the GPU when torch sees one; `--set train.device=cpu`);
on a GPU every phase boundary synchronizes the device, so each phase is charged its own kernels.
Refresh is inline (single process): the time a refresh costs shows up as wait on the steps that re-encode, so
index phases are reported as means per step (amortised over refresh.every) beside p20/p50/p80.
Writes results.json (per-step times too), results.csv and one Markdown table. Not a test: no asserts.
"""

from __future__ import annotations

import dataclasses
import math
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
from realm_hpc.device import trainer_device  # noqa: E402
from realm_hpc.models.realm import Realm  # noqa: E402
from realm_hpc.retrieval.refresh import InlineRefresher  # noqa: E402
from realm_hpc.train import build_optimizer, fresh_index  # noqa: E402

PHASES = ("index_swap", "index_wait", "data", "retrieve", "fwd_bwd", "optimizer")


@dataclass(kw_only=True)
class TrainStepBench:
    recipe: str = "tiny"
    overrides: list[str] = field(default_factory=lambda: ["refresh.every=10"])  # --set on the recipe
    repeats: int = 30  # timed steps
    warmup: int = 3  # untimed first steps (allocator, lazy imports)
    out: str = "runs/bench/train-step"


def quick() -> TrainStepBench:
    return TrainStepBench(overrides=["refresh.every=4"], repeats=8, warmup=1)


def config(quick_run: bool = False, **overrides) -> TrainStepBench:
    base = quick() if quick_run else TrainStepBench()
    if overrides.get("overrides"):  # the user's --set come after the bench's own refresh.every
        overrides["overrides"] = [*base.overrides, *overrides["overrides"]]
    cfg = utils.with_overrides(base, overrides, "train-step")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ValueError("bench train-step: --repeats must be positive")
    return cfg


class _TimedIndex:
    """LiveIndex as Realm.forward sees it, adding up the time its searches take (``sync``: wait for the device)."""

    def __init__(self, live, sync):
        self.live, self.sync, self.spent = live, sync, 0.0

    def search(self, *args, **kwargs):
        self.sync()
        t = time.perf_counter()
        out = self.live.search(*args, **kwargs)
        self.sync()
        self.spent += time.perf_counter() - t
        return out


def _clock(device: torch.device):
    """time.perf_counter after the device's queued work is done: CUDA kernels run asynchronously, and a phase
    must not be charged for the kernels its predecessor queued."""
    if device.type != "cuda":
        return time.perf_counter, lambda: None

    def sync():
        torch.cuda.synchronize(device)

    def clock():
        sync()
        return time.perf_counter()

    return clock, sync


def run(cfg: TrainStepBench) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    mcfg, data = utils.recipe_data(cfg.recipe, [*cfg.overrides, "refresh.mode=inline"], out)
    torch.manual_seed(mcfg.train.seed)
    device = trainer_device(mcfg.train.device)
    clock, sync = _clock(device)
    model = Realm(mcfg, data.vocab_size).to(device)  # initialised on the CPU, as Pretrainer does: same weights
    model.train()
    k = mcfg.retrieval.k
    opt, sched = build_optimizer(model, mcfg, mcfg.optim.lr * mcfg.optim.retriever_lr_scale)
    live = fresh_index(model, data, mcfg, 1, 0)
    timed = _TimedIndex(live, sync)
    refresher = InlineRefresher(data.blocks, mcfg.refresh.every, mcfg.refresh.batch_size)
    meta = utils.run_meta(device, packages=("torch", "numpy", "transformers"))
    meta["config"] = dataclasses.asdict(cfg)
    meta["model"] = {"recipe": mcfg.recipe, "corpus_docs": len(data.blocks), "batch_size": mcfg.train.batch_size,
                     "k": k, "refresh_every": mcfg.refresh.every, "refresh_mode": "inline",
                     "params": sum(p.numel() for p in model.parameters()), "device": str(device)}
    print(f"{meta['device']}  sha {meta['git_sha']}  {len(data.blocks)} docs, batch {mcfg.train.batch_size}, "
          f"k {k}, refresh every {mcfg.refresh.every}", flush=True)
    steps = []
    for step in range(cfg.warmup + cfg.repeats):
        t0 = clock()
        event = refresher.step_boundary(step, model.retriever.doc, live)
        t1 = clock()
        batch = data.train_batch(step, mcfg.train.batch_size, mcfg.train.seed).to(device)
        t2 = clock()
        timed.spent = 0.0
        loss = -model(batch, data, timed, k, train_retriever=True).log_marginal.mean()
        loss.backward()
        t3 = clock()
        torch.nn.utils.clip_grad_norm_(model.parameters(), mcfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t4 = clock()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"bench train-step: loss is {loss.item()} at step {step}")
        if step >= cfg.warmup:
            steps.append(dict(step=step, swapped=event.swapped, index_wait=event.wait_s * 1e3,
                              index_swap=max(0.0, (t1 - t0 - event.wait_s) * 1e3), data=(t2 - t1) * 1e3,
                              retrieve=timed.spent * 1e3, fwd_bwd=(t3 - t2 - timed.spent) * 1e3,
                              optimizer=(t4 - t3) * 1e3, total=(t4 - t0) * 1e3))
    refresher.close()
    mean_total = float(np.mean([s["total"] for s in steps]))
    rows = []
    for phase in (*PHASES, "total"):
        v = np.array([s[phase] for s in steps])
        p20, p50, p80 = (float(x) for x in np.percentile(v, utils.QUANTILES))
        rows.append(dict(phase=phase, mean_ms=float(v.mean()), p20_ms=p20, p50_ms=p50, p80_ms=p80,
                         share=float(v.mean()) / mean_total, steps=len(steps)))
    meta["wall_s"] = time.perf_counter() - t_start
    result = dict(meta=meta, rows=rows, steps=steps, swaps=sum(s["swapped"] for s in steps))
    utils.write_results(out, result, COLUMNS)
    print("\n" + utils.markdown(rows, COLUMNS))
    print(f"\n{len(steps)} steps timed ({result['swaps']} index swaps); wrote {out}/results.json, results.csv "
          f"in {meta['wall_s']:.1f} s")
    return result


COLUMNS = [("phase", "{}"), ("mean_ms", "{:.2f}"), ("p50_ms", "{:.2f}"), ("p20_ms", "{:.2f}"), ("p80_ms", "{:.2f}"),
           ("share", "{:.3f}"), ("steps", "{}")]


def main(argv=None) -> None:
    from realm_hpc.cli import main as cli_main

    cli_main(["bench", "train-step", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
