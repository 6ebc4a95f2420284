"""`realm-hpc` subcommands. Thin: parse, build, run; every user error is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from realm_hpc import preempt  # noqa: E402
from realm_hpc.config import Config, ConfigError, apply_overrides, load_config  # noqa: E402
from realm_hpc.recipes import RECIPES, get_recipe  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realm-hpc", description="REALM retrieval-augmented pretraining.")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="ICT warm start + REALM pretraining (+ evaluation, summary.json)")
    pre.add_argument("--recipe", default="demo", help=f"one of: {', '.join(sorted(RECIPES))}")
    pre.add_argument("--out", required=True, help="run directory")
    pre.add_argument("--steps", type=int, help="REALM steps (overrides train.steps)")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
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
    ft.add_argument("--deepspeed-config", metavar="JSON",
                    help="DeepSpeed JSON for the trainers (sets train.deepspeed; several trainers default to ZeRO-2)")

    ev = sub.add_parser("evaluate", help="recall@k and MLM accuracy of a run's checkpoint; with --qa: Open-QA EM")
    ev.add_argument("--run", required=True)
    ev.add_argument("--qa", help="a .qa.csv/.jsonl file: exact match and recall@k of a fine-tuned run")

    ex = sub.add_parser("export", help="a run's query encoder, doc encoder and reader as plain HF directories")
    ex.add_argument("--run", required=True, help="a run directory (its checkpoint)")
    ex.add_argument("--out", required=True, help="the export directory (written atomically)")

    bi = sub.add_parser("build-index", help="encode a corpus with a checkpoint's doc encoder into an index directory")
    bi.add_argument("--run", help="a run directory: its checkpoint and its corpus")
    bi.add_argument("--checkpoint", help="a checkpoint directory (config.json in it or beside it); needs --corpus")
    bi.add_argument("--corpus", help="DPR .tsv or .jsonl corpus to encode (with --checkpoint)")
    bi.add_argument("--out", required=True, help="the index directory (written atomically)")
    bi.add_argument("--backend", help="exact | faiss-flat | faiss-ivfpq (index.backend)")
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
    return p


PREEMPTIBLE = {"pretrain", "finetune"}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        # SIGUSR1/SIGTERM -> checkpoint at the next step boundary; other commands keep the default (terminate).
        with preempt.handlers() if args.command in PREEMPTIBLE else nullcontext():
            {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "export": cmd_export,
             "build-index": cmd_build_index, "retrieve": cmd_retrieve, "bench": cmd_bench,
             "refresher": cmd_refresher}[args.command](args)
    except preempt.Preempted as e:
        # Not an error: a clean exit that job scripts (slurm/*.sbatch) answer with a requeue and --resume.
        print(f"{e}; exit {preempt.EXIT_PREEMPTED}, continue with --resume", file=sys.stderr, flush=True)
        sys.exit(preempt.EXIT_PREEMPTED)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(f"error: {e}", code=2)
    except RuntimeError as e:
        _fail(f"error: {e}", code=1)


def _fail(message: str, code: int) -> None:
    print(message.splitlines()[0] if message else "error", file=sys.stderr, flush=True)
    from realm_hpc.dist import launched_by_mpi

    if launched_by_mpi() and "mpi4py.MPI" in sys.modules:
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)  # the other ranks would wait forever
    sys.exit(code)


# -- pretrain ------------------------------------------------------------------------------------------------------
def resolve_config(args) -> Config:
    saved = Path(args.out) / "config.json"
    if args.resume and saved.exists():
        cfg = load_config(str(saved))
    else:
        cfg = get_recipe(args.recipe)
    if args.steps is not None:
        args.set = [*args.set, f"train.steps={args.steps}"]
    # --refreshers asks for refresher ranks; an explicit --set refresh.mode=inline beside it is an error (cmd_pretrain)
    implied = ["refresh.mode=mpi"] if getattr(args, "refreshers", None) is not None else []
    return apply_overrides(cfg, [*implied, *args.set, *_deepspeed_override(args)])


def _deepspeed_override(args) -> list[str]:
    if not getattr(args, "deepspeed_config", None):
        return []
    # absolute, so that a --resume from another directory finds it again (config.json keeps it)
    return [f"train.deepspeed={Path(args.deepspeed_config).resolve()}"]


def _trainer_group(cfg: Config):
    """Every rank a trainer: mpiexec (COMM_WORLD), torchrun (RANK/WORLD_SIZE), or a plain launch (one trainer)."""
    from realm_hpc.dist import init_trainer_group, launched_by_mpi

    if launched_by_mpi():
        from mpi4py import MPI

        return init_trainer_group(MPI.COMM_WORLD, force=bool(cfg.train.deepspeed), device=cfg.train.device)
    return init_trainer_group(None, force=bool(cfg.train.deepspeed), device=cfg.train.device)


def _write_run_config(run_dir: Path, cfg: Config, group) -> None:
    """Trainer 0 creates the run directory and its config.json; the others wait for it."""
    from realm_hpc.checkpoint import atomic_write_json
    from realm_hpc.dist import barrier

    if group.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
    barrier(group)


def _leave_trainer_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_pretrain(args) -> None:
    import torch

    from realm_hpc.dist import (init_trainer_group, launched_by_mpi, leave_if_finalize_would_hang, mpi_roles, print0,
                                 spawn_would_wait_forever, trainer_comm)
    from realm_hpc.train import Pretrainer

    cfg = resolve_config(args)
    run_dir = Path(args.out)
    factory, roles, comm, made = None, None, None, []
    if args.refreshers is not None and cfg.refresh.mode != "mpi":
        raise ConfigError(f"--refreshers {args.refreshers} asks for refresher ranks, but refresh.mode="
                          f"{cfg.refresh.mode}: drop one of them")
    if cfg.refresh.mode == "mpi":
        if not launched_by_mpi():
            raise ConfigError("refresh.mode=mpi needs an MPI launch: mpiexec -n 2 realm-hpc pretrain ...")
        n_refreshers = 1 if args.refreshers is None else args.refreshers
        if n_refreshers < 1:
            raise ConfigError("--refreshers must be >= 1 (for inline refresh: --set refresh.mode=inline)")
        roles, comm = mpi_roles(n_refreshers=n_refreshers)
        sub = trainer_comm(comm, roles)
        if not roles.is_trainer:
            torch.set_num_threads(1)  # the trainers keep the cores; a refresher is busy only between swaps
            _serve_refresher(comm, roles.refresher_index, roles.n_refreshers)
            return
        group = init_trainer_group(sub, force=bool(cfg.train.deepspeed), device=cfg.train.device)
        from realm_hpc.retrieval.refresh import MPIRefresher, RefresherSpawner, TrainerBroadcastRefresher

        respawn = cfg.refresh.respawn
        if respawn and (why := spawn_would_wait_forever()):
            print0(f"warning: refresh.respawn off: {why}; a lost refresher leaves the last index "
                   "(export SLURM_OVERLAP=1 before srun to allow replacements)", file=sys.stderr)
            respawn = False
        spawner = RefresherSpawner(sub, roles.n_refreshers) if respawn else None

        def factory(data):
            inner = None
            if group.rank == 0:
                inner = MPIRefresher(comm, roles.refresher_ranks, len(data.blocks), cfg.model.proj_dim,
                                     cfg.refresh.every, str(run_dir), timeout_s=cfg.refresh.timeout_s,
                                     spawner=None if group.distributed else spawner)
            made.append(inner if not group.distributed else
                        TrainerBroadcastRefresher(inner, group, len(data.blocks), cfg.model.proj_dim, spawner))
            return made[-1]
    else:  # inline refresh: every rank is a trainer
        group = _trainer_group(cfg)
    _write_run_config(run_dir, cfg, group)  # the others read run_dir/data only after trainer 0 created it
    try:
        summary = Pretrainer(cfg, run_dir, resume=args.resume, refresher_factory=factory, group=group).run()
    except BaseException as e:
        # A preemption in the REALM loop already stopped the refreshers (the loop closes its refresher).
        if factory is not None and group.rank == 0 and not (isinstance(e, preempt.Preempted) and e.checkpointed):
            from realm_hpc.retrieval.refresh import TAG_STOP

            inner = made[0] if made else None
            inner = getattr(inner, "inner", inner)  # the MPIRefresher: it knows the refreshers in use
            talk, ranks = (inner.comm, inner.refreshers) if inner is not None else (comm, roles.refresher_ranks)
            for r in ranks:  # let the refreshers exit instead of waiting forever
                talk.isend("lost" if inner is not None and inner.losses else None, dest=r, tag=TAG_STOP)
        raise
    _leave_trainer_group()
    print0(format_summary(summary))
    print0(f"wrote {run_dir / 'summary.json'}, {run_dir / 'metrics.jsonl'}, {run_dir / 'curves.png'}")
    leave_if_finalize_would_hang(bool(made and made[0].losses))  # the run's files are written


def cmd_refresher(args) -> None:
    from mpi4py import MPI  # first: the trainers wait in MPI_Comm_spawn until this process has initialised MPI

    from realm_hpc.dist import leave_if_finalize_would_hang

    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        raise ConfigError("realm-hpc refresher is started by the trainers (MPI_Comm_spawn), not by hand")
    import torch

    torch.set_num_threads(1)
    _serve_refresher(parent, shard_index=parent.Get_rank(), n_shards=parent.Get_size())
    leave_if_finalize_would_hang(True)  # spawned after a rank died: its Finalize would wait on the dead one


def _serve_refresher(comm, shard_index: int, n_shards: int) -> None:
    from realm_hpc.dist import leave_if_finalize_would_hang
    from realm_hpc.retrieval.refresh import serve_refresher

    def make_encoder(run_dir: str):
        from realm_hpc.data.blocks import BlockStore
        from realm_hpc.data.tokenizer import load_tokenizer
        from realm_hpc.models.encoders import Encoder

        from realm_hpc.device import node_local_rank, refresher_device

        cfg = load_config(str(Path(run_dir) / "config.json"))
        tokenizer = load_tokenizer(cfg.model.pretrained or Path(run_dir) / "data" / "tokenizer")
        # The weights arrive as CPU floats (load_flat_params copies them in); embeddings go back as CPU numpy.
        device = refresher_device(cfg.refresh.device, node_local_rank())
        encoder = Encoder(cfg.model, len(tokenizer), cfg.model.block_len).to(device)
        return encoder, BlockStore.open(Path(run_dir) / "data" / "blocks"), cfg.refresh.batch_size

    stop = serve_refresher(comm, trainer=0, shard_index=shard_index, n_shards=n_shards, make_encoder=make_encoder)
    leave_if_finalize_would_hang(stop == "lost")  # replaced after another rank died


def format_summary(summary: dict) -> str:
    width = max(len(k) for k in summary)
    lines = ["", "summary", "-" * (width + 14)]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


# -- evaluate, build-index, retrieve --------------------------------------------------------------------------
def _load_run(run: str):
    from realm_hpc.checkpoint import load_checkpoint
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.models.realm import Realm

    run_dir = Path(run)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir / 'config.json'}: not a run directory (no config.json)")
    cfg = load_config(str(run_dir / "config.json"))
    data = PretrainData(cfg, run_dir, build=False)
    model = Realm(cfg, data.vocab_size)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint")["model"])
    model.eval()
    return cfg, data, model


def cmd_finetune(args) -> None:
    from realm_hpc.dist import print0
    from realm_hpc.finetune import Finetuner

    out = Path(args.out)
    cfg = _finetune_config(args)
    group = _trainer_group(cfg)
    _write_run_config(out, cfg, group)
    summary = Finetuner(cfg, out, resume=args.resume, group=group).run()
    _leave_trainer_group()
    print0(format_summary(summary))
    print0(f"wrote {out / 'summary.json'}, {out / 'eval'}/, {out / 'metrics.jsonl'}")


def _finetune_config(args) -> Config:
    """The saved config on --resume, else the pretrained run's model and data with the recipe's qa section."""
    from realm_hpc.recipes import FINETUNE_RECIPES

    out = Path(args.out)
    overrides = [*args.set, *_deepspeed_override(args)]
    if args.resume and (out / "config.json").exists():
        cfg = apply_overrides(load_config(str(out / "config.json")), overrides)
    else:
        if args.recipe not in FINETUNE_RECIPES:
            known = ", ".join(sorted(FINETUNE_RECIPES))
            raise ConfigError(f"finetune: unknown recipe '{args.recipe}' (known: {known})")
        if not args.pretrained:
            raise ConfigError("finetune: --pretrained RUN_DIR is required")
        pre = Path(args.pretrained) / "config.json"
        if not pre.exists():
            raise FileNotFoundError(f"{pre}: not a run directory (no config.json)")
        cfg = load_config(str(pre))  # the pretrained run's model and data; the recipe's qa section
        cfg.recipe, cfg.qa = args.recipe, FINETUNE_RECIPES[args.recipe]().qa
        cfg.qa.pretrained = str(args.pretrained)
        cfg = apply_overrides(cfg, overrides)
    return cfg


def cmd_evaluate(args) -> None:
    from realm_hpc.checkpoint import atomic_write_json

    if args.qa:
        from realm_hpc.finetune import evaluate_run

        print(format_summary(evaluate_run(args.run, args.qa)))
        return
    from realm_hpc.evaluate import mlm_accuracy, retrieval_metrics, share
    from realm_hpc.train import fresh_index

    from realm_hpc.device import trainer_device

    cfg, data, model = _load_run(args.run)
    model.to(trainer_device(cfg.train.device))  # where the run evaluated itself: the numbers of its summary
    k = cfg.retrieval.k
    index = fresh_index(model, data, cfg, 0, 0)
    recall, reach = retrieval_metrics(model, data, index, k)
    result = {f"recall_at_{k}": recall,
              f"chance_recall_at_{k}": data.chance_recall(k),
              f"span_in_top_{k}": share(reach),
              "mlm_acc_retrieval": mlm_accuracy(model, data, index, k, cfg.eval.batch_size),
              "eval_examples": len(data.eval)}
    atomic_write_json(Path(args.run) / "eval.json", result)
    print(format_summary(result))


def _load_checkpoint_dir(ckpt: str):
    """(cfg, tokenizer, model) from a checkpoint directory; config.json and data/tokenizer are looked up in it,
    then beside it (a run's checkpoint/ sits in the run directory)."""
    from realm_hpc.checkpoint import load_checkpoint
    from realm_hpc.data.tokenizer import load_tokenizer
    from realm_hpc.models.realm import Realm

    ckpt_dir = Path(ckpt)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory")
    found = [d / "config.json" for d in (ckpt_dir, ckpt_dir.parent) if (d / "config.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{ckpt_dir / 'config.json'}: no config.json in the checkpoint or beside it")
    cfg = load_config(str(found[0]))
    tok_dirs = [Path(cfg.model.pretrained)] if cfg.model.pretrained else [
        d / "tokenizer" for d in (ckpt_dir, ckpt_dir / "data", found[0].parent / "data")]
    tok_dir = next((d for d in tok_dirs if d.is_dir()), tok_dirs[0])
    tokenizer = load_tokenizer(tok_dir)
    model = Realm(cfg, len(tokenizer))
    model.load_state_dict(load_checkpoint(ckpt_dir)["model"])
    model.eval()
    return cfg, tokenizer, model


def cmd_export(args) -> None:
    from realm_hpc.export import export_model

    run_dir = Path(args.run)
    cfg, tokenizer, model = _load_checkpoint_dir(str(run_dir / "checkpoint"))
    out = export_model(cfg, tokenizer, model, args.out, source=str(run_dir.resolve()))
    print(f"exported query_encoder/, doc_encoder/, reader/ to {out}")


def cmd_build_index(args) -> None:
    import tempfile

    from realm_hpc.data.blocks import BlockStore
    from realm_hpc.data.corpus import read_corpus
    from realm_hpc.retrieval.store import build_index

    if bool(args.run) == bool(args.checkpoint) or bool(args.checkpoint) != bool(args.corpus):
        raise ConfigError("build-index needs --run DIR, or --checkpoint DIR with --corpus FILE")
    index_sets = [f"index.{key}={value}" for key, value in (("backend", args.backend), ("dtype", args.dtype))
                  if value]
    out = Path(args.out)
    if args.run:
        cfg, data, model = _load_run(args.run)
        cfg = apply_overrides(cfg, [*args.set, *index_sets])
        build_index(model, data.blocks, data.tokenizer, cfg, out)
        count = len(data.blocks)
    else:
        cfg, tokenizer, model = _load_checkpoint_dir(args.checkpoint)
        cfg = apply_overrides(cfg, [*args.set, *index_sets])
        docs = read_corpus(args.corpus)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.blocks-") as tmp:
            blocks = BlockStore.build(docs, tokenizer, Path(tmp) / "blocks", max_len=cfg.model.block_len)
            build_index(model, blocks, tokenizer, cfg, out)
        count = len(docs)
    print(f"wrote {out} ({count} documents, dim {cfg.model.proj_dim}, {cfg.index.dtype}, {cfg.index.backend})")


def cmd_retrieve(args) -> None:
    from realm_hpc.retrieval.store import SavedIndex

    if bool(args.question) == bool(args.queries):
        raise ConfigError("retrieve needs a question or --queries FILE (not both)")
    if args.out and not args.queries:
        raise ConfigError("--out goes with --queries")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.queries:
        from realm_hpc.retrieval.queries import read_queries, write_results

        queries = read_queries(args.queries)  # every line checked before the index is loaded
        index = SavedIndex.open(args.index)
        write_results(index, queries, args.k, args.batch_size, args.out)
        if args.out:
            print(f"wrote {args.out} ({len(queries)} queries, top {args.k})")
        return
    index = SavedIndex.open(args.index)
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
