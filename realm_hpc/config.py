"""The typed configuration tree: one source of truth for every knob.

`--set section.field=value` overrides a field; the value is parsed by the field's type. An unknown or mistyped
key is a one-line `ConfigError` naming it, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


DEVICES = ("auto", "cpu", "cuda")  # train.device, refresh.device


@dataclass(kw_only=True)
class ModelConfig:
    pretrained: str = ""  # a local HF BERT directory; empty = small BERTs from scratch with the sizes below
    vocab_size: int = 2000  # WordPiece vocabulary trained on the corpus when `pretrained` is empty
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    intermediate: int = 512
    proj_dim: int = 128  # REALM's retrieval embedding size
    pooling: str = "cls"  # cls (REALM) | mean: a small BERT from scratch learns ICT far faster with mean pooling
    normalize: bool = False  # L2-normalise the pooled vector before the projection (sentence-transformers' Normalize)
    proj_init: str = "random"  # random | pca: the corpus's top proj_dim principal directions (for pretrained encoders)
    pca_score_scale: float = 20.0  # proj_init=pca: relevance = this x the inner product of the projected vectors
    block_len: int = 288  # [CLS] title [SEP] text [SEP]
    query_len: int = 64
    reader_len: int = 192  # [CLS] x [SEP] z [SEP], z truncated to fit
    copy_head: bool = False  # pointer/copy head on the reader (see FACTS: a tiny reader from scratch needs it)
    dropout: float = 0.1  # BERT hidden + attention dropout (0 makes runs with different trainer counts comparable)


@dataclass(kw_only=True)
class DataConfig:
    corpus: str = ""  # DPR .tsv, .jsonl or Wikipedia-summaries .json; empty = the embedded fact world
    world_people: int = 1200
    world_orgs: int = 240
    world_cities: int = 80
    world_surnames: int = 90  # fewer surnames than people: distractors that share name parts
    world_alias_rate: float = 0.8  # share of secondary mentions that use an alias ("M. Kessler")
    world_seed: int = 0
    heldout_facts: int = 300
    # Held-out examples: test (reported in the summary, evaluated at the start and the end only) and dev (ICT's
    # early stopping and every mid-run evaluation); they share no world fact / corpus article (data/examples.py).
    eval_examples: int = 300
    dev_examples: int = 300


@dataclass(kw_only=True)
class RetrievalConfig:
    k: int = 8
    null_doc: bool = True
    exclude_source: bool = True  # REALM's trivial-retrieval exclusion
    enabled: bool = True  # False = closed-book: the reader sees only the null document


@dataclass(kw_only=True)
class RefreshConfig:
    mode: str = "inline"  # inline | mpi
    # steps between index refreshes; 0 = never: the index built after ICT stays for the whole run (the stale-index
    # ablation's floor, realm-hpc bench staleness), in both modes
    every: int = 50
    batch_size: int = 128  # documents per encoder forward while re-encoding
    max_staleness: int = 200  # warn when the live index was built from weights older than this many steps
    timeout_s: float = 300.0  # mpi: a refresh in flight this long means the refreshers died; train on without them
    respawn: bool = True  # mpi: replace lost refreshers (MPI_Comm_spawn) where the launcher allows it
    # auto | cpu | cuda: where a refresher rank re-encodes (auto: a GPU of its node when there is one, shared
    # round-robin by node-local rank with whatever else runs there; realm_hpc.device.refresher_device)
    device: str = "auto"


@dataclass(kw_only=True)
class IndexConfig:
    """Where the training index lives (`sharded`) and the saved index `build-index` writes
    (realm_hpc/retrieval/store.py); 0 = the backend's own default."""
    sharded: bool = False  # with several trainers: each holds 1/T of the index, queries are all-gathered
    # fp32 | bf16: the training index the trainers hold and search (bf16: half the memory, meant for GPUs; the
    # retrieved top-k is re-scored by the current encoders wherever the retriever trains)
    live_dtype: str = "fp32"
    backend: str = "exact"  # exact | faiss-flat | faiss-ivfpq (IndexIVFPQ + IndexRefineFlat re-rank)
    dtype: str = "fp32"  # embeddings.npy storage: fp32 | fp16 | bf16 (bf16 bits stored as uint16)
    nlist: int = 0  # faiss-ivfpq inverted lists (0 = 2 sqrt(N))
    m: int = 0  # faiss-ivfpq PQ sub-quantizers, must divide model.proj_dim (0 = D / 4)
    nprobe: int = 0  # faiss-ivfpq lists scanned per query (0 = nlist / 32)
    k_factor: int = 8  # faiss-ivfpq: re-rank k * k_factor candidates exactly


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    retriever_lr_scale: float = 0.1  # a lower retriever LR keeps the reader's early noise from collapsing it
    head_lr_scale: float = 1.0  # the reader's heads (MLM prediction head, copy head) vs its BERT body; a
    # pretrained BERT without an MLM head starts these fresh, and they learn too slowly at a fine-tuning LR
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclass(kw_only=True)
class ICTConfig:
    steps: int = 200  # 0 disables the ICT warm start
    batch_size: int = 64
    lr: float = 1e-3
    keep_sentence_prob: float = 0.1  # REALM/ORQA keep the query sentence in its block 10% of the time
    eval_every: int = 50
    patience: int = 2  # stop once this many evaluations in a row did not raise recall (ICT has converged)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    reader_warmup_steps: int = 100  # first steps: the reader alone (retriever frozen) on the top docs
    # docs the reader sees during warm-up (1 = the top-1 retrieved doc; with warmup_source_block the first is the
    # query's own block and the others the top retrieved ones, the source excluded)
    reader_warmup_k: int = 1
    # During the warm-up only, the source block may be retrieved: its copy of the masked sentence teaches the
    # reader to copy from documents at all. REALM's trivial-retrieval exclusion holds for every later step.
    warmup_allow_source: bool = True
    # During the warm-up only, the reader reads the query's own block instead of retrieved docs: every masked span is
    # there to copy (wiki, measured: a fresh MLM head's loss halves within ~100 such steps, and does not move in 80
    # steps on the top-1 retrieved doc, which holds the span a third of the time).
    warmup_source_block: bool = False
    # The warm-up's loss: "marginal" (REALM's, over the docs and the null doc) or "per_doc": the mean over those
    # docs of log p(y|z,x), each doc on its own. The marginal trains the reader almost only on the doc that holds
    # the span (the source block); per_doc also trains it on the docs that do not, where it must fall back on the
    # vocabulary instead of copying (wiki, README).
    warmup_loss: str = "marginal"
    retriever_freeze_steps: int = 0  # REALM steps with the retriever frozen after the warm-up
    # From the reader warm-up on, the doc encoder keeps its start weights (after ICT) and only the query encoder
    # learns: the index then stays exact without a refresh, REALM scores the top-k from it instead of re-encoding
    # them, and the final index is the start's (no re-encode). REALM's stale-index gradient reaches a trained doc
    # encoder only through the re-scored top-k; with no refresh in a short run it moves the doc encoder away from
    # the index it searches (wiki, README).
    freeze_doc_encoder: bool = False
    # With freeze_doc_encoder: REALM's loss + this x mean ||f(x) - g(x)||^2 over each batch's queries with their masked
    # tokens put back. The frozen g is where f started (both encoders start as one when ict.steps=0), so f keeps its
    # ranking of plain sentences and questions while it learns the cloze queries (wiki, README). 0 = off.
    query_anchor: float = 0.0
    # REALM's retriever gradient only from the queries for which a retrieved doc holds the masked span (its tokens, in
    # order; every span where several are masked): for the others the posterior over docs the reader cannot copy
    # from is the reader's taste, noise to the retriever (82-84 % of the wiki run's queries; README). The reader
    # still learns from every query. Off = REALM as published.
    retriever_span_gate: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    grad_accum: int = 1  # micro batches per step: global batch = micro batch x trainers x grad_accum
    deepspeed: str = ""  # a DeepSpeed JSON (configs/ds_zero2.json); several trainers use ZeRO-2 defaults without one
    # auto | cpu | cuda: where a trainer (pretraining and fine-tuning) keeps its model and batches. auto = this
    # trainer's own GPU when CUDA is there and the node has a GPU per trainer, else the CPU (realm_hpc/device.py)
    device: str = "auto"
    # torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG in trainers and refreshers (realm_hpc/device.py):
    # on a GPU, the same run gives the same losses (scatter_add_ and the embedding backward otherwise vary)
    deterministic: bool = False


@dataclass(kw_only=True)
class EvalConfig:
    closed_book_baseline: bool = False  # also train the reader closed-book with the same budget
    # Also BM25 (bm25s) over the run's documents on the test split: gold recall@1/k/20 beside the dense retriever's
    bm25_baseline: bool = False
    batch_size: int = 32


@dataclass(kw_only=True)
class QAConfig:
    """Open-QA fine-tuning (realm-hpc finetune): the doc encoder and index stay fixed, query encoder + reader train."""
    pretrained: str = ""  # the pretraining run directory the fine-tune starts from (set by --pretrained)
    train: str = ""  # .qa.csv / .jsonl files; empty = questions generated from the embedded fact world
    dev: str = ""
    test: str = ""
    corpus: str = ""  # DPR .tsv / .jsonl to retrieve from instead of the pretraining corpus (the swap is supported)
    dev_fraction: float = 0.1  # generated questions: share of facts for dev, and for test (facts never shared)
    test_fraction: float = 0.1
    phrasings_per_fact: int = 1
    k: int = 5
    max_span_len: int = 5  # answer spans of at most this many tokens
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    retriever_lr_scale: float = 1.0
    warmup_steps: int = 20
    retriever_init: str = "pretrained"  # pretrained | random: the ablation that fine-tunes an untrained retriever
    closed_book_baseline: bool = True  # also fine-tune the reader alone (no retrieval) with the same budget
    eval_every: int = 200
    eval_examples: int = 0  # dev questions scored during training (0 = all)
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0


@dataclass(kw_only=True)
class Config:
    recipe: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ict: ICTConfig = field(default_factory=ICTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    qa: QAConfig = field(default_factory=QAConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        m = self.model
        checks = [
            *_finite_floats(self),
            *_at_least(self, 1, "model.hidden", "model.layers", "model.heads", "model.intermediate", "model.proj_dim",
                       "model.vocab_size", "model.query_len", "ict.batch_size", "ict.eval_every", "ict.patience",
                       "train.steps", "train.reader_warmup_k", "train.log_every", "train.eval_every",
                       "train.checkpoint_every", "refresh.batch_size", "eval.batch_size", "qa.steps",
                       "qa.phrasings_per_fact", "data.world_people", "data.world_orgs", "data.world_cities",
                       "data.world_surnames", "data.eval_examples"),
            *_at_least(self, 0, "ict.steps", "train.reader_warmup_steps", "train.retriever_freeze_steps",
                       "optim.warmup_steps", "optim.weight_decay", "optim.retriever_lr_scale", "qa.warmup_steps",
                       "qa.retriever_lr_scale", "qa.eval_examples", "refresh.max_staleness", "refresh.timeout_s",
                       "data.heldout_facts", "data.dev_examples"),
            *_positive(self, "optim.lr", "optim.head_lr_scale", "optim.grad_clip", "ict.lr", "qa.lr"),
            (0.0 <= self.ict.keep_sentence_prob <= 1.0, "ict.keep_sentence_prob must be in [0, 1]"),
            (m.hidden % m.heads == 0 if m.heads >= 1 else True,
             f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}"),
            # [CLS] title [SEP] text [SEP]: room for at least one token of text
            (m.block_len >= 4, f"model.block_len={m.block_len}: a block needs at least 4 tokens"),
            (self.refresh.mode in ("inline", "mpi"), "refresh.mode must be 'inline' or 'mpi'"),
            (self.retrieval.k >= 1, "retrieval.k must be >= 1"),
            (self.model.pooling in ("cls", "mean"), "model.pooling must be 'cls' or 'mean'"),
            (self.model.proj_init in ("random", "pca"), "model.proj_init must be 'random' or 'pca'"),
            (self.model.pca_score_scale > 0, "model.pca_score_scale must be > 0"),
            (self.refresh.every >= 0, "refresh.every must be >= 0 (0 = never refresh)"),
            (self.train.device in DEVICES, "train.device must be 'auto', 'cpu' or 'cuda'"),
            (self.refresh.device in DEVICES, "refresh.device must be 'auto', 'cpu' or 'cuda'"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (self.train.warmup_loss in ("marginal", "per_doc"), "train.warmup_loss must be 'marginal' or 'per_doc'"),
            (self.train.query_anchor >= 0 and (self.train.query_anchor == 0 or self.train.freeze_doc_encoder),
             "train.query_anchor must be >= 0 and needs train.freeze_doc_encoder=true (the frozen doc encoder is the "
             "anchor)"),
            (0.0 <= self.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
            (0.0 <= self.data.world_alias_rate <= 1.0, "data.world_alias_rate must be in [0, 1]"),
            (self.model.query_len < self.model.reader_len, "model.query_len must be < model.reader_len"),
            (self.index.backend in ("exact", "faiss-flat", "faiss-ivfpq"),
             "index.backend must be 'exact', 'faiss-flat' or 'faiss-ivfpq'"),
            (self.index.dtype in ("fp32", "fp16", "bf16"), "index.dtype must be 'fp32', 'fp16' or 'bf16'"),
            (self.index.live_dtype in ("fp32", "bf16"), "index.live_dtype must be 'fp32' or 'bf16'"),
            (min(self.index.nlist, self.index.m, self.index.nprobe) >= 0 and self.index.k_factor >= 1,
             "index.nlist, index.m, index.nprobe must be >= 0 and index.k_factor >= 1"),
            (self.qa.k >= 1, "qa.k must be >= 1"),
            (self.qa.max_span_len >= 1, "qa.max_span_len must be >= 1"),
            (min(self.qa.batch_size, self.qa.log_every, self.qa.eval_every, self.qa.checkpoint_every) >= 1,
             "qa.batch_size, qa.log_every, qa.eval_every and qa.checkpoint_every must be >= 1"),
            (self.qa.retriever_init in ("pretrained", "random"), "qa.retriever_init must be 'pretrained' or 'random'"),
            (0.0 <= self.qa.dev_fraction and 0.0 <= self.qa.test_fraction
             and self.qa.dev_fraction + self.qa.test_fraction < 1.0, "qa.dev_fraction + qa.test_fraction must be < 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _at_least(cfg: Config, low: int, *keys: str) -> list[tuple[bool, str]]:
    return [(_value(cfg, k) >= low, f"{k}={_value(cfg, k)}: must be >= {low}") for k in keys]


def _positive(cfg: Config, *keys: str) -> list[tuple[bool, str]]:
    return [(_value(cfg, k) > 0, f"{k}={_value(cfg, k)}: must be > 0") for k in keys]


def _finite_floats(cfg: Config) -> list[tuple[bool, str]]:
    """nan and inf parse as floats, and no knob means them (nan would also slip through every comparison)."""
    out = []
    for part in dataclasses.fields(cfg):
        section = getattr(cfg, part.name)
        for f in dataclasses.fields(section) if dataclasses.is_dataclass(section) else ():
            value = getattr(section, f.name)
            if type(value) is float:
                out.append((math.isfinite(value), f"{part.name}.{f.name}={value}: must be a finite number"))
    return out


def _parse_value(key: str, raw: str, current: Any) -> Any:
    kind = type(current)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"config key '{key}': cannot parse {raw!r} as {kind.__name__}") from None


def _section_and_field(cfg: Config, key: str) -> tuple[Any, str]:
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            where = ".".join(parts[:depth]) or "config"
            raise ConfigError(f"unknown config key '{key}' ({where} has: {', '.join(names)})")
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                raise ConfigError(f"config key '{key}' is a section; set one of its fields")
            return node, part
        node = getattr(node, part)
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[:depth + 1])}' is not a section)")
    raise ConfigError(f"empty config key '{key}'")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node, name = _section_and_field(cfg, key.strip())
        setattr(node, name, _parse_value(key, raw, getattr(node, name)))
    return cfg.validate()


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `config.json`; unknown keys and wrong types are errors, as for --set."""
    cfg = Config()

    def flatten(values: dict, prefix: str = ""):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for key, value in flatten(data):
        node, name = _section_and_field(cfg, key)
        current = getattr(node, name)
        numeric_widening = type(current) is float and type(value) is int
        if type(value) is not type(current) and not numeric_widening:
            raise ConfigError(f"config key '{key}': expected {type(current).__name__}, got {value!r}")
        setattr(node, name, type(current)(value))
    return cfg.validate()


def read_json(path: str | Path, error: type[Exception] = ConfigError):
    """A whole JSON file (run config, DeepSpeed JSON, index meta); invalid JSON is one `error` naming file:line."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_config(path: str) -> Config:
    return from_dict(read_json(path))
