"""`realm-hpc` subcommands. Parse and dispatch only: each command turns its arguments into a config (realm_hpc/runs.py)
and hands it to the room that runs it (launch.py for pretrain/finetune and refresher ranks, train.py / finetune.py
for evaluation, retrieval/store.py for index directories, bench/ for benchmarks). Every user error is one line and
a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from realm_hpc import preempt  # noqa: E402
from realm_hpc.config import ConfigError  # noqa: E402
from realm_hpc.recipes import RECIPES  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realm-hpc", description="REALM retrieval-augmented pretraining.")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="ICT warm start + REALM pretraining (+ evaluation, summary.json)")
    pre.add_argument("--recipe", default="demo", help=f"one of: {', '.join(sorted(RECIPES))}")
    pre.add_argument("--out", required=True, help="run directory")
    pre.add_argument("--steps", type=int, help="REALM steps (overrides train.steps)")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    pre.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out (without it, an --out that holds a run is refused)")
    pre.add_argument("--refreshers", type=int,
                     help="the last M MPI ranks re-encode the corpus, a shard each (sets refresh.mode=mpi; "
                          "default 1 when the recipe's refresh.mode is mpi)")
    pre.add_argument("--deepspeed-config", metavar="JSON",
                     help="DeepSpeed JSON for the trainers (e.g. configs/ds_zero2.json; sets train.deepspeed)")

    # Started by the trainers (MPI_Comm_spawn) to replace a lost refresher; everything else comes over MPI.
    sub.add_parser("refresher", help="internal: a replacement refresher rank spawned by the trainers")

    ft = sub.add_parser("finetune", help="Open-QA fine-tune of a pretrained run (fixed index; query encoder + reader)")
    ft.add_argument("--recipe", default="qa-demo", help="qa-demo | qa-tiny (only its qa section is used)")
    ft.add_argument("--pretrained", help="the pretraining run directory (not needed with --resume)")
    ft.add_argument("--out", required=True, help="fine-tune run directory")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ft.add_argument("--resume", action="store_true", help="continue the fine-tune in --out from its checkpoint")
    ft.add_argument("--overwrite", action="store_true",
                    help="replace the run in --out (without it, an --out that holds a run is refused)")
    ft.add_argument("--deepspeed-config", metavar="JSON",
                    help="DeepSpeed JSON for the trainers (sets train.deepspeed; several trainers default to ZeRO-2)")

    ev = sub.add_parser("evaluate", help="recall@k and MLM accuracy of a run's checkpoint (test and dev); with --qa: "
                                         "Open-QA EM of a fine-tuned run, or retrievers compared (--index)")
    ev.add_argument("--run", help="a pretraining run, or with --qa a fine-tuned run")
    ev.add_argument("--qa", help="a .qa.csv/.jsonl file: exact match and recall@k of a fine-tuned run (--run), or "
                                 "top-k retrieval accuracy of indexes (--index)")
    ev.add_argument("--index", action="append", default=[], metavar="INDEX_DIR",
                    help="with --qa: an index directory (dense or bm25), repeatable; one table row each, no reader")
    ev.add_argument("--out", help="with --index: the JSON file (default runs/eval/NAME.retrieval.json)")
    ev.add_argument("--hybrid", action="store_true",
                    help="with --index: one more row per dense and BM25 index pair, their score fusion")
    ev.add_argument("--hybrid-weight", type=float, default=0.5, metavar="W",
                    help="with --hybrid: the dense side's weight after min-max normalisation (default 0.5)")

    ex = sub.add_parser("export", help="a run's query encoder, doc encoder and reader as plain HF directories")
    ex.add_argument("--run", required=True, help="a run directory (its checkpoint)")
    ex.add_argument("--out", required=True, help="the export directory (written atomically)")

    bi = sub.add_parser("build-index", help="encode a corpus with a checkpoint's doc encoder into an index directory, "
                                            "or index it with BM25 (--backend bm25, no checkpoint)")
    bi.add_argument("--run", help="a run directory: its checkpoint and its corpus (bm25: its corpus)")
    bi.add_argument("--checkpoint", help="a checkpoint directory (config.json in it or beside it); needs --corpus")
    bi.add_argument("--corpus", help="DPR .tsv or .jsonl corpus to encode (with --checkpoint) or to index (bm25)")
    bi.add_argument("--out", required=True, help="the index directory (written atomically)")
    bi.add_argument("--start", action="store_true",
                    help="with --run: the retriever the run started REALM from (rebuilt from its config; needs "
                         "ict.steps=0), not its checkpoint's")
    bi.add_argument("--backend", help="exact | faiss-flat | faiss-ivfpq (index.backend) | bm25 (bm25s, no encoder)")
    bi.add_argument("--dtype", help="embeddings.npy storage: fp32 | fp16 | bf16 (index.dtype)")
    bi.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. index.nlist=1024 index.m=32 index.nprobe=16")

    rt = sub.add_parser("retrieve", help="top-k documents of an index for a question or a file of them")
    rt.add_argument("--index", required=True)
    rt.add_argument("--k", type=int, default=8)
    rt.add_argument("--queries", help="questions: .jsonl ({\"id\"?, \"question\"|\"query\"|\"text\"}) or text, "
                                      "one per line; JSONL results")
    rt.add_argument("--out", help="with --queries: write the JSONL here (atomically) instead of stdout")
    rt.add_argument("--batch-size", type=int, default=64, help="with --queries: questions per search")
    rt.add_argument("question", nargs="?")

    be = sub.add_parser("bench", help="benchmarks (the checkout's bench/ scripts)")
    bsub = be.add_subparsers(dest="bench_command", required=True)
    br = bsub.add_parser("retrieval", help="retrieval throughput and recall: backend x B x N x D x dtype")
    br.add_argument("--quick", action="store_true", help="the < 1 minute CPU grid (N=50k)")
    br.add_argument("--out", help="output directory (default runs/bench/retrieval)")
    br.add_argument("--backends", nargs="+", help="exact faiss-flat faiss-ivfpq (default: all)")
    br.add_argument("--batch-sizes", type=int, nargs="+", metavar="B")
    br.add_argument("--n", type=int, nargs="+", metavar="N", help="index sizes (synthetic data)")
    br.add_argument("--dim", type=int, nargs="+", metavar="D")
    br.add_argument("--dtype", nargs="+", help="fp32 bf16 fp16 (faiss backends: fp32 only)")
    br.add_argument("--index", help="a saved index directory instead of synthetic vectors")
    br.add_argument("--k", type=int)
    br.add_argument("--nprobe", type=int, nargs="+", help="IVF-PQ settings swept for the recall-vs-QPS curve")
    br.add_argument("--repeats", type=int, help="minimum timing rounds per cell")
    br.add_argument("--seed", type=int)
    for name, text in (("refresh", "re-encode docs/s of the refresher path vs a bare HF forward loop"),
                       ("train-step", "time per REALM step: retrieve / fwd+bwd / optimizer / index swap / wait")):
        bp = bsub.add_parser(name, help=text)
        bp.add_argument("--quick", action="store_true", help="a few seconds on CPU")
        bp.add_argument("--out", help=f"output directory (default runs/bench/{name})")
        bp.add_argument("--recipe", help="the model and corpus of this recipe (default tiny)")
        bp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        bp.add_argument("--repeats", type=int, help="minimum timing rounds" if name == "refresh" else "timed steps")
        if name == "refresh":
            bp.add_argument("--docs", type=int, help="documents re-encoded per timed pass")
            bp.add_argument("--batch-size", type=int, help="documents per forward (default refresh.batch_size)")
    st = bsub.add_parser("staleness", help="the stale-index ablation: one recipe pretrained at several refresh "
                                           "intervals (+ the MPI refresher at one), a row per run")
    st.add_argument("--quick", action="store_true", help="a small world, <= 15 min on 2 cores")
    st.add_argument("--out", help="output directory, a run per row in it (default runs/bench/staleness)")
    st.add_argument("--recipe", help="the recipe every row pretrains (default demo)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    st.add_argument("--intervals", nargs="+", type=_refresh_every, metavar="N|never",
                    help="refresh.every of the inline rows (default 25 100 400 never)")
    st.add_argument("--mpi-intervals", nargs="*", type=_refresh_every, metavar="N",
                    help="of those, the ones also run with the MPI refresher (default 25; none: no MPI row)")
    return p


def _refresh_every(text: str) -> int:
    """refresh.every as the bench takes it: a step count, or 'never' (0)."""
    if text == "never":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or 'never', got {text!r}") from None


PREEMPTIBLE = {"pretrain", "finetune"}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        # SIGUSR1/SIGTERM/SIGINT -> checkpoint at the next step boundary; other commands keep the default.
        with preempt.handlers() if args.command in PREEMPTIBLE else nullcontext():
            {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "export": cmd_export,
             "build-index": cmd_build_index, "retrieve": cmd_retrieve, "bench": cmd_bench,
             "refresher": cmd_refresher}[args.command](args)
    except preempt.Preempted as e:
        # Not an error: a clean exit that job scripts (slurm/*.sbatch) answer with a requeue and --resume.
        print(f"{e}; exit {preempt.EXIT_PREEMPTED}, continue with --resume", file=sys.stderr, flush=True)
        sys.exit(preempt.EXIT_PREEMPTED)
    except KeyboardInterrupt:
        # Ctrl-C outside a training loop, or a second one inside: stop now, the last checkpoint stays as it was.
        kept = " (a second Ctrl-C stops at once: the last checkpoint, if any, is kept)" if args.command in PREEMPTIBLE \
            else ""
        _fail(f"interrupted{kept}", code=preempt.EXIT_INTERRUPTED)
    except (ConfigError, ValueError) as e:
        _fail(f"error: {e}", code=2)
    except OSError as e:  # the environment: a missing file, no permission, a full disk, a file where a dir should be
        where = f"{e.filename}: " if e.filename and e.strerror else ""
        _fail(f"error: {where}{e.strerror if where else e}", code=2 if isinstance(e, FileNotFoundError) else 1)
    except RuntimeError as e:
        _fail(f"error: {e}", code=1)


def _fail(message: str, code: int) -> None:
    print(message.splitlines()[0] if message else "error", file=sys.stderr, flush=True)
    from realm_hpc.dist import launched_by_mpi

    if launched_by_mpi() and "mpi4py.MPI" in sys.modules:
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)  # the other ranks would wait forever
    sys.exit(code)


# -- commands: each parses its arguments into a config and hands it to the room that runs it ------------------------
def cmd_pretrain(args) -> None:
    from realm_hpc.launch import pretrain
    from realm_hpc.runs import pretrain_config

    cfg = pretrain_config(args.out, args.recipe, args.set, resume=args.resume, steps=args.steps,
                          refreshers=args.refreshers, deepspeed_config=args.deepspeed_config)
    pretrain(cfg, Path(args.out), resume=args.resume, refreshers=args.refreshers, overwrite=args.overwrite)


def cmd_refresher(args) -> None:
    from realm_hpc.launch import replacement_refresher

    replacement_refresher()


def cmd_finetune(args) -> None:
    from realm_hpc.launch import finetune
    from realm_hpc.runs import finetune_config

    cfg = finetune_config(args.out, args.recipe, args.pretrained, args.set, resume=args.resume,
                          deepspeed_config=args.deepspeed_config)
    finetune(cfg, Path(args.out), resume=args.resume, overwrite=args.overwrite)


def cmd_evaluate(args) -> None:
    from realm_hpc.metrics import format_summary

    if args.index:
        if not args.qa or args.run:
            raise ConfigError("evaluate --index needs --qa FILE and no --run")
        from realm_hpc.evaluate import compare_retrievers

        out = Path(args.out or Path("runs") / "eval" / f"{Path(args.qa).name.split('.')[0]}.retrieval.json")
        _, table = compare_retrievers(args.qa, args.index, out, hybrid_weight=args.hybrid_weight if args.hybrid
                                      else None)
        print(table)
        print(f"wrote {out}")
        return
    if args.hybrid:
        raise ConfigError("--hybrid goes with --qa FILE --index INDEX_DIR ...")
    if not args.run:
        raise ConfigError("evaluate needs --run DIR, or --qa FILE with --index INDEX_DIR")
    if args.out:
        raise ConfigError("--out goes with --index")
    if args.qa:
        from realm_hpc.finetune import evaluate_run
        result = evaluate_run(args.run, args.qa)
    else:
        from realm_hpc.train import evaluate_run
        result = evaluate_run(args.run)
    print(format_summary(result))


def cmd_export(args) -> None:
    from realm_hpc.export import export_model
    from realm_hpc.runs import load_checkpoint_dir

    run_dir = Path(args.run)
    cfg, tokenizer, model = load_checkpoint_dir(run_dir / "checkpoint")
    out = export_model(cfg, tokenizer, model, args.out, source=str(run_dir.resolve()))
    print(f"exported query_encoder/, doc_encoder/, reader/ to {out}")


def cmd_build_index(args) -> None:
    from realm_hpc.runs import build_bm25_index_dir, build_index_dir

    if args.backend == "bm25":
        if bool(args.run) == bool(args.corpus) or args.checkpoint:
            raise ConfigError("build-index --backend bm25 needs --corpus FILE or --run DIR (no checkpoint)")
        if args.dtype or args.set or args.start:
            raise ConfigError("build-index --backend bm25 takes no --dtype, --set or --start (it stores no embeddings)")
        count = build_bm25_index_dir(args.out, run=args.run, corpus=args.corpus)
        print(f"wrote {args.out} ({count} documents, bm25)")
        return
    if bool(args.run) == bool(args.checkpoint) or bool(args.checkpoint) != bool(args.corpus):
        raise ConfigError("build-index needs --run DIR, or --checkpoint DIR with --corpus FILE")
    index_sets = [f"index.{key}={value}" for key, value in (("backend", args.backend), ("dtype", args.dtype))
                  if value]
    cfg, count = build_index_dir(args.out, [*args.set, *index_sets], run=args.run, checkpoint=args.checkpoint,
                                 corpus=args.corpus, start=args.start)
    print(f"wrote {args.out} ({count} documents, dim {cfg.model.proj_dim}, {cfg.index.dtype}, {cfg.index.backend})")


def cmd_retrieve(args) -> None:
    from realm_hpc.retrieval.store import open_index

    if bool(args.question) == bool(args.queries):
        raise ConfigError("retrieve needs a question or --queries FILE (not both)")
    if args.question is not None and not args.question.strip():  # --queries files refuse blank questions too
        raise ConfigError("retrieve: the question is blank (give a question or --queries FILE)")
    if args.out and not args.queries:
        raise ConfigError("--out goes with --queries")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.queries:
        from realm_hpc.retrieval.queries import read_queries, write_results

        queries = read_queries(args.queries)  # every line checked before the index is loaded
        index = open_index(args.index)
        write_results(index, queries, args.k, args.batch_size, args.out)
        if args.out:
            print(f"wrote {args.out} ({len(queries)} queries, top {args.k})")
        return
    index = open_index(args.index)
    for rank, (doc_id, title, score) in enumerate(index.retrieve(args.question, args.k), 1):
        print(f"{rank:>3}  {score:9.4f}  {doc_id:>10}  {title}")
    sys.stdout.flush()


# -- bench -----------------------------------------------------------------------------------------------------------
def cmd_bench(args) -> None:
    bench = _bench_module(f"bench_{args.bench_command.replace('-', '_')}")
    if args.bench_command == "retrieval":
        cfg = bench.config(quick_run=args.quick, out=args.out, backends=args.backends, batch_sizes=args.batch_sizes,
                           n=args.n, dim=args.dim, dtypes=args.dtype, index=args.index, k=args.k, nprobe=args.nprobe,
                           min_repeats=args.repeats, seed=args.seed)
    elif args.bench_command == "staleness":
        cfg = bench.config(quick_run=args.quick, out=args.out, recipe=args.recipe, overrides=args.set or None,
                           intervals=args.intervals, mpi_intervals=args.mpi_intervals)
    else:
        extra = dict(docs=args.docs, batch_size=args.batch_size) if args.bench_command == "refresh" else {}
        cfg = bench.config(quick_run=args.quick, out=args.out, recipe=args.recipe, overrides=args.set or None,
                           repeats=args.repeats, **extra)
    bench.run(cfg)


def _bench_module(name: str):
    """bench/ sits beside the package in the checkout (an editable install), not inside it."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / f"{name}.py").is_file():
        raise FileNotFoundError(f"{root / 'bench' / name}.py: realm-hpc bench needs the source checkout "
                                "(pip install -e .)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"bench.{name}")


if __name__ == "__main__":
    main()
