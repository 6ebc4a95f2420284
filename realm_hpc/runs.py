"""Run directories: the configuration a run starts or resumes with, and loading a finished run or a checkpoint.

A run directory holds `config.json` (the resolved configuration), `data/` (tokenizer, block store), `checkpoint/`
and the run's outputs. Everything that reads one back (evaluate, export, build-index, the fine-tune's pretrained
model) loads it here, so there is one loader of a run's config, data and weights.
"""

from __future__ import annotations

from pathlib import Path

from realm_hpc.config import Config, ConfigError, apply_overrides, load_config
from realm_hpc.recipes import FINETUNE_RECIPES, get_recipe


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
    saved = Path(out) / "config.json"
    cfg = load_config(str(saved)) if resume and saved.exists() else get_recipe(recipe)
    implied = ["refresh.mode=mpi"] if refreshers is not None else []
    steps_set = [f"train.steps={steps}"] if steps is not None else []
    return apply_overrides(cfg, [*implied, *overrides, *steps_set, *deepspeed_override(deepspeed_config)])


def finetune_config(out: str | Path, recipe: str, pretrained: str | None, overrides: list[str],
                    resume: bool = False, deepspeed_config: str | None = None) -> Config:
    """The saved config on --resume, else the pretrained run's model and data with the recipe's qa section."""
    out = Path(out)
    overrides = [*overrides, *deepspeed_override(deepspeed_config)]
    if resume and (out / "config.json").exists():
        return apply_overrides(load_config(str(out / "config.json")), overrides)
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


def write_run_config(run_dir: Path, cfg: Config, group) -> None:
    """Trainer 0 creates the run directory and its config.json; the others wait for it."""
    from realm_hpc.checkpoint import atomic_write_json
    from realm_hpc.dist import barrier

    if group.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
    barrier(group)


# -- loading a run or a checkpoint ---------------------------------------------------------------------------------
def load_run(run: str | Path):
    """(cfg, data, model) of a pretraining run directory: its config, data and checkpointed weights, in eval mode
    on the CPU."""
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


def load_checkpoint_dir(ckpt: str | Path):
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
        build_index(model, data.blocks, data.tokenizer, cfg, out, texts=[d.text for d in data.docs],
                    embeddings=embeddings)
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
