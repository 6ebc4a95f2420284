"""From a corpus to training batches: the tokenizer, the block store, masked query sentences and held-out
evaluation examples. Everything a run needs lives under `run_dir/data/` and is rebuilt only when missing.

Held-out examples come in two splits that share no world fact (embedded world) or source article (a corpus):
**dev**, which everything a run decides reads (ICT's early stopping, every mid-run evaluation), and **test**, read
at the start and at the end only, which the summary reports. Every read goes through `PretrainData.heldout(split)`.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from realm_hpc.config import Config, ConfigError
from realm_hpc.data.blocks import BlockStore, cut_long_docs, max_chars
from realm_hpc.data.corpus import read_corpus, write_jsonl
from realm_hpc.data.masking import (SalientSpans, TokenizedSentence, char_to_token_span, mask_sentence,
                                    tokenize_sentences)
from realm_hpc.data.tokenizer import load_tokenizer, train_wordpiece
from realm_hpc.data.world import build_world
from realm_hpc.dist import print0

SPLITS = ("dev", "test")

# A sentence ends at . ! ? followed by space and a capital, except after an initial ("M. Kessler").
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[A-Z]\.)\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


@dataclass
class Sentences:
    """Candidate queries: each sentence, the block it came from, and its span in that block's text."""
    text: list[str]
    doc: np.ndarray  # int64 block index
    span: np.ndarray  # [n, 2] char span in the doc text (used by ICT to cut the sentence out of its block)
    tokens: list[TokenizedSentence]


@dataclass
class EvalExample:
    sentence: TokenizedSentence
    span: tuple[int, int]  # token range of the masked value
    source: int  # the block the sentence came from: never a valid retrieval
    gold: list[int]  # blocks that state the fact (empty when the corpus has no fact annotations)
    text: str = ""  # the sentence (sentence.offsets index into it)

    def text_without_span(self) -> str:
        """The sentence with the masked span's characters cut out: a lexical retriever's query (BM25), the words a
        dense query encoder sees around its [MASK] tokens."""
        a, b = int(self.sentence.offsets[self.span[0]][0]), int(self.sentence.offsets[self.span[1] - 1][1])
        return f"{self.text[:a].rstrip()} {self.text[b:].lstrip()}".strip()


@dataclass
class Batch:
    query_ids: torch.Tensor  # [B, Lq] [CLS] x [SEP], masked
    query_mask: torch.Tensor
    x_tokens: list[np.ndarray]  # masked x without special tokens, for the reader's input
    positions: torch.Tensor  # [B, T] masked positions in x (0-based, padded with 0)
    targets: torch.Tensor  # [B, T] target ids (padded with 0)
    target_mask: torch.Tensor  # [B, T] 1.0 on real targets
    source: torch.Tensor  # [B] int64 block of origin (excluded from retrieval)

    def to(self, device: torch.device | str) -> "Batch":
        """The tensors on `device` (x_tokens stay numpy: they only build reader rows); itself when already there."""
        device = torch.device(device)
        if self.query_ids.device == device:
            return self
        return Batch(self.query_ids.to(device), self.query_mask.to(device), self.x_tokens, self.positions.to(device),
                     self.targets.to(device), self.target_mask.to(device), self.source.to(device))


class PretrainData:
    def __init__(self, cfg: Config, run_dir: Path, build: bool = True):
        self.cfg = cfg
        data_dir = run_dir / "data"
        docs, sentences, heldout_raw, self.salient = _load_docs(cfg)
        if build and not (data_dir / "blocks" / "meta.json").exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl(docs, data_dir / "corpus.jsonl")
            if cfg.model.pretrained:
                tokenizer = load_tokenizer(cfg.model.pretrained)
            else:
                texts = [f"{d.title} {d.text}" for d in docs]
                tokenizer = train_wordpiece(texts, cfg.model.vocab_size, data_dir / "tokenizer")
            cut = BlockStore.build(docs, tokenizer, data_dir / "blocks", max_len=cfg.model.block_len).meta["docs_cut"]
            if cut:
                print0(f"note: {cut} of {len(docs)} documents are longer than a block (model.block_len="
                       f"{cfg.model.block_len} tokens): only their first tokens can be retrieved")
        self.tokenizer = load_tokenizer(cfg.model.pretrained or data_dir / "tokenizer")
        self.blocks = BlockStore.open(data_dir / "blocks")
        self.docs = docs
        self.vocab_size = len(self.tokenizer)
        self.cls_id, self.sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        self.pad_id, self.mask_id = self.tokenizer.pad_token_id, self.tokenizer.mask_token_id
        q_len = cfg.model.query_len
        texts, doc_idx, spans = zip(*sentences) if sentences else ((), (), ())
        self.train = Sentences(list(texts), np.asarray(doc_idx, np.int64), np.asarray(spans, np.int64).reshape(-1, 2),
                               tokenize_sentences(self.tokenizer, list(texts), q_len, self.salient))
        self._heldout = {split: self._eval_examples(heldout_raw[split]) for split in SPLITS}
        if cfg.data.dev_examples > 0 and not self._heldout["dev"]:
            raise ConfigError(f"data.dev_examples={cfg.data.dev_examples}: no held-out example is left for dev (each "
                              "shares a fact or article with test); raise data.heldout_facts or lower "
                              "data.eval_examples")

    def heldout(self, split: str) -> list[EvalExample]:
        """The held-out examples of `split`: "dev" (early stopping, mid-run evaluation, any choice) or "test" (the
        start and the end of a run only)."""
        if split not in SPLITS:
            raise ValueError(f"unknown held-out split {split!r} (expected one of {', '.join(SPLITS)})")
        return self._heldout[split]

    def _eval_examples(self, raw) -> list[EvalExample]:
        if not raw:  # data.dev_examples=0 (the tokenizer refuses an empty batch)
            return []
        toks = tokenize_sentences(self.tokenizer, [r[0] for r in raw], self.cfg.model.query_len, self.salient)
        out = []
        for (text, (a, b), source, gold), sent in zip(raw, toks):
            span = char_to_token_span(sent.offsets, a, b)
            if span is not None:
                out.append(EvalExample(sent, span, source, gold, text))
        return out

    def chance_recall(self, k: int, split: str) -> float:
        """Expected recall@k of a uniformly random ranking (source excluded) on a held-out split."""
        n = len(self.blocks) - 1
        hits = [1.0 - np.prod([(n - len(e.gold) - i) / (n - i) for i in range(k)])
                for e in self.heldout(split) if e.gold]
        return float(np.mean(hits)) if hits else float("nan")

    # -- batches ------------------------------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The batch of a step is a function of (seed, step) alone, so a resumed run sees the same data."""
        n = len(self.train.text)
        first = step * batch_size
        picks = []
        for c in range(first, first + batch_size):
            epoch, pos = divmod(c, n)
            picks.append(int(self._epoch_order(seed, epoch)[pos]))
        rng = np.random.default_rng((seed, 1, step))
        masked = [mask_sentence(self.train.tokens[i], self.mask_id, rng) for i in picks]
        return self._collate(masked, [int(self.train.doc[i]) for i in picks])

    @functools.lru_cache(maxsize=2)
    def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((seed, epoch)).permutation(len(self.train.text))

    def eval_batches(self, split: str, batch_size: int):
        examples = self.heldout(split)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            rng = np.random.default_rng(0)
            masked = [mask_sentence(e.sentence, self.mask_id, rng, span=e.span) for e in chunk]
            yield chunk, self._collate(masked, [e.source for e in chunk])

    def _collate(self, masked, sources) -> Batch:
        q_len = self.cfg.model.query_len
        B = len(masked)
        T = max(len(p) for _, p, _ in masked)
        query = torch.full((B, q_len), self.pad_id, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        targets = torch.zeros(B, T, dtype=torch.long)
        tmask = torch.zeros(B, T)
        xs = []
        for b, (ids, pos, tgt) in enumerate(masked):
            x = ids[: q_len - 2]
            keep = pos < len(x)
            xs.append(x)
            row = np.concatenate([[self.cls_id], x, [self.sep_id]])
            query[b, : len(row)] = torch.from_numpy(row.astype(np.int64))
            positions[b, : keep.sum()] = torch.from_numpy(pos[keep])
            targets[b, : keep.sum()] = torch.from_numpy(tgt[keep].astype(np.int64))
            tmask[b, : keep.sum()] = 1.0
        return Batch(query, (query != self.pad_id).long(), xs, positions, targets, tmask,
                     torch.tensor(sources, dtype=torch.long))

    def ict_batch(self, step: int, batch_size: int, seed: int, keep_prob: float):
        """Inverse cloze task: a sentence as the query, its block with the sentence removed (mostly) as the
        positive, the other blocks of the batch as negatives. Returns (query batch, block batch)."""
        rng = np.random.default_rng((seed, 2, step))
        picks = rng.choice(len(self.train.text), size=batch_size, replace=False)
        # One sentence per block, so no in-batch negative is secretly a positive.
        _, first = np.unique(self.train.doc[picks], return_index=True)
        picks = picks[np.sort(first)]
        q_len, b_len = self.cfg.model.query_len, self.cfg.model.block_len
        queries = self.tokenizer([self.train.text[i] for i in picks], truncation=True, max_length=q_len,
                                 padding=True, return_tensors="pt")
        titles, bodies = [], []
        for i in picks:
            doc = self.docs[self.train.doc[i]]
            a, b = self.train.span[i]
            text = doc.text if rng.random() < keep_prob else (doc.text[:a] + doc.text[b:]).strip()
            titles.append(doc.title)
            bodies.append(text)
        # longest_first cuts only the body while it is the longer part (every block of a real corpus), as only_second
        # would, but also a title that alone overflows a short model.block_len, where only_second raises.
        blocks = self.tokenizer(titles, bodies, truncation="longest_first", max_length=b_len, padding=True,
                                return_tensors="pt")
        return queries, blocks

    # -- reader inputs ------------------------------------------------------------------------------------------
    def reader_inputs(self, batch: Batch, doc_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[CLS] x [SEP] z [SEP]` for every (query, doc) pair; doc id -1 is the null document (empty z).

        doc_ids: [B, K]. Returns tensors of [B*K, L] plus `positions` [B*K, T] shifted past [CLS].
        """
        B, K = doc_ids.shape
        L = self.cfg.model.reader_len
        rows, doc_spans = [], []
        for b in range(B):
            x = batch.x_tokens[b]
            head = np.concatenate([[self.cls_id], x, [self.sep_id]]).astype(np.int64)
            for d in doc_ids[b].tolist():
                z = self.blocks.tokens(d)[1:].astype(np.int64) if d >= 0 else np.asarray([self.sep_id], np.int64)
                z = z[: L - len(head)]
                if z[-1] != self.sep_id:
                    z[-1] = self.sep_id
                rows.append(np.concatenate([head, z]))
                doc_spans.append((len(head), len(head) + len(z)))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        type_ids = torch.zeros_like(input_ids)
        for i, (r, (a, b)) in enumerate(zip(rows, doc_spans)):
            input_ids[i, : len(r)] = torch.from_numpy(r)
            type_ids[i, a:b] = 1
        attention = (input_ids != self.pad_id).long()
        doc_mask = (type_ids == 1) & (input_ids != self.sep_id) & (input_ids != self.pad_id)
        positions = (batch.positions + 1).repeat_interleave(K, dim=0)
        return dict(input_ids=input_ids, attention_mask=attention, token_type_ids=type_ids, doc_mask=doc_mask,
                    positions=positions, targets=batch.targets.repeat_interleave(K, dim=0),
                    target_mask=batch.target_mask.repeat_interleave(K, dim=0))


def _load_docs(cfg: Config):
    """Docs, candidate sentences (text, doc, span), held-out examples (text, char span, source, gold) of each split
    ({"dev": [...], "test": [...]}) and the salient span finder with the corpus' lexicon."""
    if not cfg.data.corpus:
        d = cfg.data
        world = build_world(people=d.world_people, orgs=d.world_orgs, cities=d.world_cities,
                            surnames=d.world_surnames, alias_rate=d.world_alias_rate,
                            heldout_facts=d.heldout_facts, seed=d.world_seed)
        sentences = [(s.text, s.doc, (s.start, s.start + len(s.text))) for s in world.training_sentences()]
        examples = world.eval_examples(None, seed=d.world_seed)
        # Test is the first eval_examples of the seeded order (the held-out set runs reported before the split);
        # dev takes the next examples of facts test never asks about.
        test = examples[:d.eval_examples]
        asked = {e.fact_id for e in test}
        dev = [e for e in examples[d.eval_examples:] if e.fact_id not in asked][:d.dev_examples]
        heldout = {split: [(e.text, e.span, e.source_doc, e.gold_docs) for e in chosen]
                   for split, chosen in (("dev", dev), ("test", test))}
        return world.docs, sentences, heldout, SalientSpans.from_texts(d.text for d in world.docs)
    return _corpus_sentences(cfg)


def _corpus_sentences(cfg: Config):
    """A plain corpus: every sentence is a candidate query; a seeded share of sentences with a salient span is
    held out for evaluation: the first `data.eval_examples` for test, then up to `data.dev_examples` for dev from
    articles that gave test none (a test article's later sentences stay training sentences).

    Gold documents for recall@k: a plain corpus states no facts, so we use its titles. When a held-out sentence
    has a salient span that is exactly the title of another document (Wikipedia: "... directed by Stanley
    Kubrick" and the article "Stanley Kubrick"), that span is the one masked and the entity's own document is the
    gold: retrieval must find the article about the masked entity among the corpus, with the source excluded as
    in training. Sentences without such a span mask a random salient span and count for MLM accuracy only.
    """
    docs, cut = cut_long_docs(read_corpus(cfg.data.corpus), cfg.model.block_len)
    if cut:
        doc_id, chars = max(cut, key=lambda c: c[1])
        print0(f"warning: data.corpus: {len(cut)} document(s) cut to their first {max_chars(cfg.model.block_len):,} "
               f"characters (the longest: id {doc_id!r}, {chars:,}): a block holds a document's first "
               f"model.block_len={cfg.model.block_len} tokens and the rest is never retrieved; split long documents "
               "into passages first (DPR: 100 words)", file=sys.stderr)
    finder = SalientSpans.from_texts(d.text for d in docs)
    by_title: dict[str, int] = {}
    for i, doc in enumerate(docs):
        by_title.setdefault(doc.title, i)
    rng = np.random.default_rng(cfg.data.world_seed)
    sentences, test, dev, test_docs = [], [], [], set()
    n_test, n_dev = cfg.data.eval_examples, cfg.data.dev_examples
    for i, doc in enumerate(docs):
        for a, b in split_sentences(doc.text):
            text = doc.text[a:b]
            spans = finder(text)
            wanted = len(test) < n_test or (len(dev) < n_dev and i not in test_docs)
            if spans and wanted and rng.random() < 0.05:
                titled = [(s, by_title[text[s[0]:s[1]]]) for s in spans
                          if by_title.get(text[s[0]:s[1]], i) != i]
                if titled:
                    span, gold = titled[rng.integers(len(titled))]
                    example = (text, span, i, [gold])
                else:
                    example = (text, spans[rng.integers(len(spans))], i, [])
                if len(test) < n_test:
                    test.append(example)
                    test_docs.add(i)
                else:
                    dev.append(example)
            else:
                sentences.append((text, i, (a, b)))
    return docs, sentences, {"dev": dev, "test": test}, finder
