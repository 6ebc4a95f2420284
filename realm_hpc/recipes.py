"""Named recipes: plain functions returning a Config. A recipe is data, not a script."""

from __future__ import annotations

from realm_hpc.config import Config, ConfigError


def demo() -> Config:
    """The `make demo` run: the embedded fact world, tiny BERTs, copy-head reader, MPI refresher, <= 10 min."""
    cfg = Config(recipe="demo")
    cfg.model.copy_head = True
    cfg.model.pooling = "mean"
    cfg.data.world_alias_rate, cfg.data.world_surnames = 0.35, 250
    cfg.ict.steps = 1500  # a cap: ICT stops once held-out recall stops rising (~500 steps here)
    # The reader warms up on the top-1 *other* block (source excluded, retriever frozen; k=1 steps are cheap), so
    # it learns to copy across paraphrases before its posterior steers the retriever; then 400 REALM steps.
    cfg.train.steps, cfg.train.reader_warmup_steps, cfg.train.warmup_allow_source = 700, 300, False
    cfg.train.eval_every = 100
    cfg.optim.retriever_lr_scale = 0.6  # 0.1 learns slowly; 1.0 collapses recall within 100 steps (measured)
    cfg.refresh.mode = "mpi"
    cfg.eval.closed_book_baseline = True
    return cfg


def tiny() -> Config:
    """For tests: a small world and short phases, inline refresh, under a minute on 2 cores."""
    cfg = Config(recipe="tiny")
    cfg.model.copy_head = True
    cfg.model.pooling = "mean"
    cfg.model.vocab_size = 800
    cfg.model.hidden, cfg.model.intermediate = 64, 256
    cfg.data.world_people, cfg.data.world_orgs, cfg.data.world_cities = 200, 40, 20
    cfg.data.world_surnames = 30
    cfg.data.heldout_facts, cfg.data.eval_examples = 60, 60
    cfg.ict.steps, cfg.ict.eval_every, cfg.ict.batch_size = 60, 30, 32
    cfg.train.steps, cfg.train.reader_warmup_steps = 60, 20
    cfg.train.eval_every, cfg.train.checkpoint_every, cfg.train.log_every = 30, 30, 5
    cfg.refresh.every = 20
    return cfg


def qa_demo() -> Config:
    """Open-QA fine-tune after `demo` (realm-hpc finetune --pretrained runs/demo): only the qa section is read;
    the model and data sections are the pretrained run's."""
    cfg = Config(recipe="qa-demo")
    cfg.qa.steps, cfg.qa.eval_every, cfg.qa.eval_examples = 600, 200, 300
    cfg.qa.lr = 5e-4
    return cfg


def qa_tiny() -> Config:
    """For tests: a fine-tune of seconds after a `tiny` pretraining."""
    cfg = Config(recipe="qa-tiny")
    cfg.qa.steps, cfg.qa.eval_every, cfg.qa.eval_examples = 100, 50, 60
    cfg.qa.lr = 1e-3
    cfg.qa.dev_fraction, cfg.qa.test_fraction = 0.15, 0.15
    return cfg


RECIPES = {"demo": demo, "tiny": tiny}
FINETUNE_RECIPES = {"qa-demo": qa_demo, "qa-tiny": qa_tiny}  # `realm-hpc finetune --recipe`


def get_recipe(name: str) -> Config:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}' (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]()
