"""Run directories: the configuration a run starts or resumes with, and loading a finished run or a checkpoint.

A run directory holds `config.json` (the resolved configuration), `data/` (tokenizer, block store), `checkpoint/`
and the run's outputs. Everything that reads one back (evaluate, export, build-index, the fine-tune's pretrained
model) loads it here, so there is one loader of a run's config, data and weights.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path

from realm_hpc.config import Config, ConfigError, apply_overrides, load_config
from realm_hpc.recipes import FINETUNE_RECIPES, get_recipe

# What a pretraining or fine-tuning run writes into its directory (crash leftovers and temp files carry these names
# with a suffix or a leading dot): what --overwrite sets aside, and nothing else.
RUN_ENTRIES = ("config.json", "checkpoint", "deepspeed", "data", "summary.json", "metrics.jsonl", "tb", "curves.png",
               "eval", "eval.json", "qa", "index", "closed_book")
# Keys a resume cannot change: the checkpoint's shapes and vocabulary, the data built under data/, and for a
# fine-tune the pretrained run, its index and its questions (written under qa/).
KEPT_ON_RESUME = ("model.", "data.")
KEPT_ON_FINETUNE_RESUME = ("qa.pretrained", "qa.corpus", "qa.retriever_init", "qa.train", "qa.dev", "qa.test",
                           "qa.dev_fraction", "qa.test_fraction", "qa.phrasings_per_fact")
FREE_ON_RESUME = ("model.dropout",)  # no shape depends on it


# -- the configuration a run starts with -----------------------------------------------------------------------------
def deepspeed_override(deepspeed_config: str | None) -> list[str]:
    """`--deepspeed-config JSON` as an override; absolute, so that a --resume from another directory finds it again
    (config.json keeps it)."""
    return [f"train.deepspeed={Path(deepspeed_config).resolve()}"] if deepspeed_config else []


def pretrain_config(out: str | Path, recipe: str, overrides: list[str], resume: bool = False,
                    steps: int | None = None, refreshers: int | None = None,
                    deepspeed_config: str | None = None) -> Config:
    """The saved config on --resume, else the recipe's; then `--steps`, `--refreshers` (it implies refresh.mode=mpi;
    beside an explicit refresh.mode=inline that is an error, see launch.pretrain) and `--set` overrides."""
    saved = saved_config(out, "pretrain") if resume else None
    cfg = copy.deepcopy(saved) if saved is not None else get_recipe(recipe)
    implied = ["refresh.mode=mpi"] if refreshers is not None else []
    steps_set = [f"train.steps={steps}"] if steps is not None else []
    cfg = apply_overrides(cfg, [*implied, *overrides, *steps_set, *deepspeed_override(deepspeed_config)])
    if saved is not None:
        check_resumable(out, saved, cfg, KEPT_ON_RESUME)
    return cfg


def finetune_config(out: str | Path, recipe: str, pretrained: str | None, overrides: list[str],
                    resume: bool = False, deepspeed_config: str | None = None) -> Config:
    """The saved config on --resume, else the pretrained run's model and data with the recipe's qa section."""
    out = Path(out)
    overrides = [*overrides, *deepspeed_override(deepspeed_config)]
    if resume:
        saved = saved_config(out, "finetune")
        cfg = apply_overrides(copy.deepcopy(saved), overrides)
        check_resumable(out, saved, cfg, (*KEPT_ON_RESUME, *KEPT_ON_FINETUNE_RESUME))
        return cfg
    if recipe not in FINETUNE_RECIPES:
        raise ConfigError(f"finetune: unknown recipe '{recipe}' (known: {', '.join(sorted(FINETUNE_RECIPES))})")
    if not pretrained:
        raise ConfigError("finetune: --pretrained RUN_DIR is required")
    pre = Path(pretrained) / "config.json"
    if not pre.exists():
        raise FileNotFoundError(f"{pre}: not a run directory (no config.json)")
    cfg = load_config(str(pre))  # the pretrained run's model and data; the recipe's qa section
    cfg.recipe, cfg.qa = recipe, FINETUNE_RECIPES[recipe]().qa
    cfg.qa.pretrained = str(pretrained)
    return apply_overrides(cfg, overrides)


def saved_config(out: str | Path, command: str) -> Config:
    """The config of the run in `out` that `command` (pretrain | finetune) --resume continues; one line when there
    is none, or when it is the other command's run."""
    path = Path(out) / "config.json"
    if not path.is_file():
        held = run_contents(Path(out))
        also = f"; it has {', '.join(held)}" if held else ""
        raise ConfigError(f"--resume: {out} holds no run (no config.json{also}): drop --resume to start one there")
    cfg = load_config(str(path))
    if bool(cfg.qa.pretrained) != (command == "finetune"):
        kind, other = ("a fine-tune", "finetune") if cfg.qa.pretrained else ("a pretraining run", "pretrain")
        raise ConfigError(f"--resume: {out} holds {kind}: continue it with realm-hpc {other} --resume")
    return cfg


def check_resumable(out: str | Path, saved: Config, cfg: Config, kept: tuple[str, ...]) -> None:
    """A resume may change step counts, learning rates, refresh and logging, not what the checkpoint and the data
    under `out` were built with; refused before anything is written, naming every key that differs."""
    before, after = _flat(saved.to_dict()), _flat(cfg.to_dict())
    differ = [f"{k} ({before[k]!r} -> {after[k]!r})" for k in before
              if k.startswith(kept) and k not in FREE_ON_RESUME and before[k] != after[k]]
    if differ:
        raise ConfigError(f"--resume: {', '.join(differ)} differ from the run in {out}, whose checkpoint and data were "
                          "built with them: drop those --set, or start a new run with another --out")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_resume_checkpoint(out: Path, cfg: Config, n_trainers: int) -> None:
    """What --resume needs of the checkpoint beyond the config (a cheap look: its tensors stay in the file). The
    vocabulary: its embedding rows are the run's tokenizer's. The trainer count, where it matters: optimizer state
    in DeepSpeed ZeRO shards loads only into as many trainers as wrote them, and a lone trainer's AdamW state (in
    state.pt) only into a lone trainer without DeepSpeed; otherwise it would be dropped without a word, or DeepSpeed
    would raise deep inside its loader."""
    from realm_hpc.checkpoint import has_checkpoint, load_checkpoint
    from realm_hpc.data.tokenizer import load_tokenizer

    if not has_checkpoint(out / "checkpoint"):
        return
    state = load_checkpoint(out / "checkpoint", mmap=True)
    rows = next((v.shape[0] for k, v in state.get("model", {}).items() if k.endswith("word_embeddings.weight")), None)
    run = Path(cfg.qa.pretrained) if cfg.qa.pretrained else out  # a fine-tune reads its pretrained run's tokenizer
    tokenizer = Path(cfg.model.pretrained) if cfg.model.pretrained else run / "data" / "tokenizer"
    if rows is not None and tokenizer.is_dir() and rows != len(load_tokenizer(tokenizer)):
        raise ConfigError(f"--resume: the checkpoint in {out} embeds {rows} tokens, the tokenizer {tokenizer} has "
                          f"{len(load_tokenizer(tokenizer))}: they are not of one run")
    saved_n = len(state.get("rng_ranks") or [None])
    deepspeed_now = n_trainers > 1 or bool(cfg.train.deepspeed)
    tag = state.get("deepspeed_tag")
    if tag and (not deepspeed_now or saved_n != n_trainers):
        raise ConfigError(f"--resume: the checkpoint in {out} keeps its optimizer state in DeepSpeed shards of "
                          f"{saved_n} trainer(s) ({out / 'deepspeed' / tag}): resume with {saved_n} trainer(s)"
                          f"{'' if deepspeed_now else ' (or train.deepspeed)'}, not {n_trainers}")
    if state.get("optimizer") is not None and deepspeed_now:
        raise ConfigError(f"--resume: the checkpoint in {out} was written by one trainer with plain AdamW "
                          f"(no train.deepspeed): resume it with one trainer and no DeepSpeed, not {n_trainers}")


# -- what a run directory holds, and the guard around starting one ---------------------------------------------------
def _is_run_entry(name: str) -> bool:
    base = name.lstrip(".")
    return any(base == e or base.startswith(e + ".") for e in RUN_ENTRIES)


def run_contents(run_dir: Path) -> list[str]:
    """What of a run `run_dir` holds, e.g. ['config.json', 'a checkpoint', 'summary.json']; [] when none."""
    from realm_hpc.checkpoint import has_checkpoint

    if not run_dir.is_dir():
        return []
    held = [name for name in ("config.json", "summary.json", "metrics.jsonl") if (run_dir / name).is_file()]
    if has_checkpoint(run_dir / "checkpoint"):
        held.insert(1, "a checkpoint")
    return held


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Read-only, by every trainer before anything is written: an --out that holds a run is refused without
    --resume or --overwrite; one that is a file, or under something that is not a writable directory, is refused
    before a run starts."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    held = [] if resume else run_contents(out)
    if held and not overwrite:
        raise ConfigError(f"--out {out} holds a run ({', '.join(held)}): continue it with --resume, choose another "
                          "--out, or replace it with --overwrite")
    parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: cannot create it, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot create it, {parent} is not writable")


# A start that fails on its input (the CLI's exit 2) or is interrupted at once (a second Ctrl-C) before its first
# checkpoint leaves --out as it found it; any other failure leaves the run's files for a look (and --resume).
_INPUT_ERRORS = (ConfigError, ValueError, OSError, KeyboardInterrupt)


@contextlib.contextmanager
def starting(out: Path, resume: bool, overwrite: bool, writer: bool):
    """Around everything a launch writes into --out (trainer 0 writes; the others pass through). A fresh start that
    fails on its input before its first checkpoint takes back what it wrote: --out is left as it was found.
    --overwrite first sets the run in --out aside (beside it, `.NAME.replaced-PID`), puts it back after such a
    failure and deletes it otherwise."""
    from realm_hpc.checkpoint import has_checkpoint

    if not writer or resume:
        yield
        return
    created = [p for p in (out.absolute(), *out.absolute().parents) if not p.exists()]
    found = set(os.listdir(out)) if out.is_dir() else set()
    aside = None
    if overwrite and run_contents(out):
        aside = out.absolute().parent / f".{out.name}.replaced-{os.getpid()}"
        aside.mkdir()
        for name in sorted(n for n in found if _is_run_entry(n)):
            os.replace(out / name, aside / name)
            found.discard(name)
    try:
        yield
    except _INPUT_ERRORS:
        if not has_checkpoint(out / "checkpoint"):
            _take_back(out, created[-1] if created else None, found, aside)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _take_back(out: Path, first_created: Path | None, found: set[str], aside: Path | None) -> None:
    """Remove what a failed start wrote: the first directory it created, else the entries of --out that were not
    there before; then move a run set aside by --overwrite back."""
    if first_created is not None:
        shutil.rmtree(first_created, ignore_errors=True)
    elif out.is_dir():
        for name in set(os.listdir(out)) - found:
            if (out / name).is_dir():
                shutil.rmtree(out / name, ignore_errors=True)
            else:
                (out / name).unlink(missing_ok=True)
    if aside is not None:
        out.mkdir(parents=True, exist_ok=True)
        for path in aside.iterdir():
            os.replace(path, out / path.name)


def write_run_config(run_dir: Path, cfg: Config, group) -> None:
    """Trainer 0 creates the run directory and its config.json; the others wait for it."""
    from realm_hpc.checkpoint import atomic_write_json
    from realm_hpc.dist import barrier

    if group.rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {run_dir}: cannot create it ({e.strerror})") from None
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
    barrier(group)


# -- loading a run or a checkpoint ---------------------------------------------------------------------------------
def load_run(run: str | Path):
    """(cfg, data, model) of a pretraining run directory: its config, data and checkpointed weights, in eval mode
    on the CPU."""
    from realm_hpc.checkpoint import load_checkpoint, load_weights
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.models.realm import Realm

    run_dir = Path(run)
    cfg = pretraining_config(run_dir)
    data = PretrainData(cfg, run_dir, build=False)
    model = Realm(cfg, data.vocab_size)
    load_weights(model, load_checkpoint(run_dir / "checkpoint")["model"], run_dir / "checkpoint")
    model.eval()
    return cfg, data, model


def pretraining_config(run_dir: Path) -> Config:
    """The config of the pretraining run in `run_dir`, once it is clear there is one with a checkpoint."""
    from realm_hpc.checkpoint import has_checkpoint

    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir / 'config.json'}: not a run directory (no config.json)")
    cfg = load_config(str(run_dir / "config.json"))
    if cfg.qa.pretrained:
        raise ConfigError(f"{run_dir} is a fine-tune (of {cfg.qa.pretrained}), not a pretraining run (a fine-tune "
                          "is scored with realm-hpc evaluate --qa FILE --run DIR)")
    if not has_checkpoint(run_dir / "checkpoint"):
        raise FileNotFoundError(f"{run_dir / 'checkpoint'}: no checkpoint (the run stopped before writing one; "
                                "continue it with realm-hpc pretrain --resume)")
    return cfg


def load_checkpoint_dir(ckpt: str | Path):
    """(cfg, tokenizer, model) from a checkpoint directory; config.json and data/tokenizer are looked up in it,
    then beside it (a run's checkpoint/ sits in the run directory)."""
    from realm_hpc.checkpoint import load_checkpoint, load_weights
    from realm_hpc.data.tokenizer import load_tokenizer
    from realm_hpc.models.realm import Realm

    ckpt_dir = Path(ckpt)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory")
    found = [d / "config.json" for d in (ckpt_dir, ckpt_dir.parent) if (d / "config.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{ckpt_dir / 'config.json'}: no config.json in the checkpoint or beside it")
    cfg = load_config(str(found[0]))
    if cfg.qa.pretrained:
        raise ConfigError(f"{found[0]}: a fine-tune's checkpoint (of {cfg.qa.pretrained}); this needs a pretraining "
                          "run's")
    tok_dirs = [Path(cfg.model.pretrained)] if cfg.model.pretrained else [
        d / "tokenizer" for d in (ckpt_dir, ckpt_dir / "data", found[0].parent / "data")]
    tok_dir = next((d for d in tok_dirs if d.is_dir()), tok_dirs[0])
    tokenizer = load_tokenizer(tok_dir)
    model = Realm(cfg, len(tokenizer))
    load_weights(model, load_checkpoint(ckpt_dir)["model"], ckpt_dir)
    model.eval()
    return cfg, tokenizer, model


def frozen_doc_index(run: str | Path):
    """The index [N, D] in a run's checkpoint, or None (a checkpoint written before REALM holds none). For a run with
    train.freeze_doc_encoder it is its doc encoder's encoding of the corpus, as build-index would compute it."""
    from realm_hpc.checkpoint import load_checkpoint

    index = load_checkpoint(Path(run) / "checkpoint").get("index")
    return None if index is None else index["embeddings"]


def build_index_dir(out: str | Path, overrides: list[str], run: str | None = None, checkpoint: str | None = None,
                    corpus: str | None = None, start: bool = False) -> tuple[Config, int]:
    """`build-index`: encode a run's corpus with its doc encoder (`run`), or a new `corpus` with a checkpoint's
    (`checkpoint`), into the index directory `out`. `start` (with `run`): the retriever the run started REALM from
    instead of its checkpoint's (train.rebuild_start). Returns the config used and the document count."""
    import tempfile

    from realm_hpc.data.blocks import BlockStore
    from realm_hpc.data.corpus import read_corpus
    from realm_hpc.retrieval.store import build_index

    out = Path(out)
    if run:
        cfg, data, model = load_run(run)
        cfg = apply_overrides(cfg, overrides)
        # A run that froze its doc encoder keeps that encoder's exact index in its checkpoint: no second encode.
        embeddings = frozen_doc_index(run) if cfg.train.freeze_doc_encoder else None
        if start:
            from realm_hpc.train import rebuild_start

            model, embeddings = rebuild_start(cfg, data, None if embeddings is None else (model, embeddings))
        # float32 whatever index.live_dtype the run searched in: the index directory's vectors are faiss's.
        build_index(model, data.blocks, data.tokenizer, cfg, out, texts=[d.text for d in data.docs],
                    embeddings=None if embeddings is None else embeddings.float())
        return cfg, len(data.blocks)
    if start:
        raise ConfigError("build-index --start needs --run DIR (the run's config rebuilds its start)")
    cfg, tokenizer, model = load_checkpoint_dir(checkpoint)
    cfg = apply_overrides(cfg, overrides)
    docs = read_corpus(corpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.blocks-") as tmp:
        blocks = BlockStore.build(docs, tokenizer, Path(tmp) / "blocks", max_len=cfg.model.block_len)
        build_index(model, blocks, tokenizer, cfg, out, texts=[d.text for d in docs])
    return cfg, len(docs)


def build_bm25_index_dir(out: str | Path, run: str | None = None, corpus: str | None = None) -> int:
    """`build-index --backend bm25`: a BM25 index of a `corpus` file, or of a run's corpus (`run`: the documents it
    wrote to data/corpus.jsonl, in its block order). No checkpoint. Returns the document count."""
    from realm_hpc.data.corpus import read_corpus
    from realm_hpc.retrieval.store import build_bm25_index

    if run:
        corpus = Path(run) / "data" / "corpus.jsonl"
        if not corpus.is_file():
            raise FileNotFoundError(f"{corpus}: no corpus in the run directory (not a run, or one still starting)")
    docs = read_corpus(corpus)
    build_bm25_index(docs, out)
    return len(docs)
