"""Held-out evaluation: recall@k of the gold document, the share of masked spans a retrieved document holds, and
exact-token MLM accuracy on salient spans. Every function names the held-out split it reads ("dev" for anything a
run decides on, "test" for the start and the end: PretrainData.heldout).

Retrievers compared on a QA file (compare_retrievers): DPR's top-k retrieval accuracy and gold recall@k of index
directories, dense or BM25, side by side; no reader involved."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from realm_hpc.checkpoint import atomic_write_json
from realm_hpc.data.blocks import contains_span
from realm_hpc.data.examples import EvalExample, PretrainData
from realm_hpc.data.qa import QAExample, has_answer, read_qa
from realm_hpc.models.realm import Realm
from realm_hpc.retrieval.index import LiveIndex
from realm_hpc.retrieval.store import open_index


@torch.no_grad()
def _retrieved(model: Realm, data: PretrainData, index: LiveIndex, k: int, batch_size: int, split: str):
    """(held-out example, its top-k block ids, source excluded) for every example of a held-out split, queries
    encoded in eval mode. Every search is a collective on a sharded index: all trainers iterate to the end."""
    was = model.training
    model.eval()
    try:
        for examples, batch in data.eval_batches(split, batch_size):
            batch = batch.to(model.device)
            q = model.retriever.query(batch.query_ids, batch.query_mask)
            _, ids = index.search(q, k, batch.source)
            yield from zip(examples, ids.tolist())
    finally:
        model.train(was)


def recall_ks(k: int) -> tuple[int, ...]:
    """The depths a run reports gold recall at: 1, its retrieval.k and 20 (the wiki run's recall@1/4/20)."""
    return tuple(sorted({1, k, 20}))


def _gold_recall(retrieved, k: int | None = None) -> float:
    """Share of the examples with gold whose gold is in their top k rows (all rows: k None)."""
    hits = [bool(set(row[:k]) & set(e.gold)) for e, row in retrieved if e.gold]
    return sum(hits) / len(hits) if hits else float("nan")


def gold_recalls(retrieved, ks: tuple[int, ...]) -> dict[int, float]:
    """{k: recall@k} from (example, rows best first) pairs searched once at depth max(ks) (or the whole index)."""
    return {k: _gold_recall(retrieved, k) for k in ks}


def _span_hits(data: PretrainData, retrieved, k: int | None = None) -> list[bool]:
    return [any(contains_span(data.blocks.tokens(d)[1:], e.sentence.ids[e.span[0]:e.span[1]]) for d in row[:k])
            for e, row in retrieved]


def bm25_retrieved(data: PretrainData, depth: int, *, split: str,
                   batch_size: int = 256) -> list[tuple[EvalExample, list[int]]]:
    """(held-out example, its top-`depth` block ids by BM25, source excluded) for every example of a split. BM25 is
    bm25s over the run's documents (retrieval/bm25.py: title + full text, as a `--backend bm25` index directory
    holds them), built here; the query is the sentence with its masked span cut out (EvalExample.text_without_span),
    so BM25 sees what the query encoder sees besides [MASK]."""
    from bm25s.stopwords import STOPWORDS_EN

    from realm_hpc.retrieval import bm25

    retriever = bm25.build([d.title for d in data.docs], [d.text for d in data.docs])
    examples, out = data.heldout(split), []
    for a in range(0, len(examples), batch_size):
        chunk = examples[a:a + batch_size]
        _, rows = bm25.search(retriever, STOPWORDS_EN, [e.text_without_span() for e in chunk], depth + 1)
        out += [(e, [r for r in row if r != e.source][:depth]) for e, row in zip(chunk, rows.tolist())]
    return out


def recall_at_k(model: Realm, data: PretrainData, index: LiveIndex, k: int, *, split: str,
                batch_size: int = 64) -> float:
    """Share of held-out masked examples whose gold document (never the excluded source) is in the top k."""
    return _gold_recall(_retrieved(model, data, index, k, batch_size, split))


def spans_in_top_k(model: Realm, data: PretrainData, index: LiveIndex, k: int, *, split: str,
                   batch_size: int = 64) -> list[bool]:
    """Per held-out masked example: whether its span (its tokens, in order) occurs in one of the top k documents
    (title or text; the source excluded), i.e. whether a reader could copy it. Needs no gold annotation, so it
    measures retrieval on any corpus."""
    return _span_hits(data, _retrieved(model, data, index, k, batch_size, split))


def retrieval_metrics(model: Realm, data: PretrainData, index: LiveIndex, k: int, *, split: str,
                      batch_size: int = 64) -> tuple[dict[int, float], list[bool]]:
    """({j: recall@j for j in recall_ks(k)}, spans_in_top_k at k) from one encoding and one search of the held-out
    queries, as deep as the deepest j (at most the corpus less the excluded source)."""
    depth = min(max(recall_ks(k)), len(data.blocks) - 1)
    retrieved = list(_retrieved(model, data, index, depth, batch_size, split))
    return gold_recalls(retrieved, recall_ks(k)), _span_hits(data, retrieved, k)


def _scored_tokens(data: PretrainData, *, split: str, batch_size: int = 64) -> list[int]:
    """Masked tokens scored per held-out example, in mlm_token_hits' order (a span cut by model.query_len counts
    only its kept tokens)."""
    return [int(n) for _, batch in data.eval_batches(split, batch_size) for n in batch.target_mask.sum(1).tolist()]


def per_token(data: PretrainData, flags: list[bool], *, split: str, batch_size: int = 64) -> torch.Tensor:
    """An example-level flag repeated over the example's masked tokens, in mlm_token_hits' order."""
    counts = _scored_tokens(data, split=split, batch_size=batch_size)
    return torch.tensor([f for f, n in zip(flags, counts, strict=True) for _ in range(n)], dtype=torch.bool)


def per_example(data: PretrainData, token_hits: torch.Tensor, *, split: str, batch_size: int = 64) -> torch.Tensor:
    """Span hits from token hits: a held-out example (one masked span) is right when all its scored tokens are.
    The unit the paired test counts: a span's tokens are not independent trials (get "Kessler" right and its
    "##ler" follows). An example with no scored token (cut away by model.query_len) is right for no model."""
    counts = _scored_tokens(data, split=split, batch_size=batch_size)
    if sum(counts) != len(token_hits):
        raise ValueError(f"{len(token_hits)} token hits for {sum(counts)} held-out masked tokens")
    return torch.tensor([n > 0 and bool(h.all()) for h, n in zip(torch.split(token_hits, counts), counts)],
                        dtype=torch.bool)


@torch.no_grad()
def mlm_token_hits(model: Realm, data: PretrainData, index: LiveIndex | None, k: int, *, split: str,
                   batch_size: int = 32) -> torch.Tensor:
    """Whether argmax_v p(v|x), marginalised over the retrieved docs, is the masked token: one bool per held-out
    masked token, always in the same order, so two models' hits pair up (per_example groups them by held-out span for
    paired_sign_test)."""
    was = model.training
    model.eval()
    hits = []
    for _, batch in data.eval_batches(split, batch_size):
        batch = batch.to(model.device)
        pred = model.predict_tokens(model(batch, data, index, k, train_retriever=False))
        hits.append((pred == batch.targets)[batch.target_mask.bool()].cpu())
    model.train(was)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def share(flags: list[bool] | torch.Tensor) -> float:
    """The share of True in hits or flags (mlm_token_hits, spans_in_top_k, or a slice of them); nan when empty."""
    return torch.as_tensor(flags, dtype=torch.bool).float().mean().item() if len(flags) else float("nan")


def mlm_accuracy(model: Realm, data: PretrainData, index: LiveIndex | None, k: int, *, split: str,
                 batch_size: int = 32) -> float:
    """Exact-token accuracy of argmax_v p(v|x), marginalised over the retrieved docs, on held-out spans."""
    return share(mlm_token_hits(model, data, index, k, split=split, batch_size=batch_size))


def paired_sign_test(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, float]:
    """McNemar's exact test on two models' hits over the same trials, which must be independent: pass per-example
    hits (`per_example`), not tokens. Returns (trials only a gets right, trials only b gets right, the two-sided
    p-value of that split if a and b were equally accurate: a fair-coin binomial tail)."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return only_a, only_b, min(1.0, 2 * tail)


def heldout_metrics(model: Realm, data: PretrainData, index: LiveIndex, k: int, batch_size: int = 32) -> dict:
    """`realm-hpc evaluate --run`: a checkpoint's recall@k, chance recall, span-in-top-k and MLM accuracy on each
    held-out split, keyed as in the run's summary.json (test_..., dev_...)."""
    out = {}
    for split in ("test", "dev"):
        recalls, reach = retrieval_metrics(model, data, index, k, split=split)
        out.update({f"{split}_recall_at_{j}": r for j, r in recalls.items()})
        out.update({f"{split}_chance_recall_at_{k}": data.chance_recall(k, split),
                    f"{split}_span_in_top_{k}": share(reach),
                    f"{split}_mlm_acc_retrieval": mlm_accuracy(model, data, index, k, split=split,
                                                               batch_size=batch_size),
                    f"{split}_examples": len(data.heldout(split))})
    return out


# -- retrievers compared on a QA file (realm-hpc evaluate --qa FILE --index DIR ...) -------------------------------
RETRIEVAL_KS = (1, 5, 20, 100)  # DPR's table


def retrieval_accuracy(index, examples: list[QAExample], ks: tuple[int, ...] = RETRIEVAL_KS,
                       batch_size: int = 64) -> dict:
    """One row of the comparison for an index directory (store.open_index): DPR's top-k retrieval accuracy (some
    top-k passage's text contains an answer, data.qa.has_answer) and, over the questions that name gold passages,
    gold recall@k (a gold passage id is in the top k). One search of depth max(ks) per question; a k beyond the
    index's size reads all of it."""
    depth = min(max(ks), len(index))
    first_answer, first_gold = [], []  # per question: the rank of its first hit (depth = none in the top depth)
    for a in range(0, len(examples), batch_size):
        chunk = examples[a:a + batch_size]
        _, rows = index.search_rows([e.question for e in chunk], depth)
        for e, row in zip(chunk, rows.tolist()):
            first_answer.append(next((r for r, i in enumerate(row) if has_answer(index.text(i), e.answers)), depth))
            if e.gold_ids:
                gold = set(e.gold_ids)
                first_gold.append(next((r for r, i in enumerate(row) if index.doc_ids[i] in gold), depth))
    wanted = {g for e in examples for g in e.gold_ids}
    # one pass over the stored ids, keeping only the wanted ones (no set of every passage id)
    present = {d for d in map(index.doc_ids.__getitem__, range(len(index))) if d in wanted} if wanted else set()
    n = len(examples)
    out = {"index": str(index.path), "backend": index.meta["backend"], "docs": len(index), "questions": n,
           "questions_with_gold": len(first_gold),
           # a gold id the index lacks can never be found: said here rather than hidden in a low recall
           "questions_gold_not_in_index": sum(1 for e in examples if e.gold_ids and not set(e.gold_ids) & present)}
    out.update({f"top_{k}_accuracy": sum(r < k for r in first_answer) / n for k in ks})
    out.update({f"gold_recall_at_{k}": sum(r < k for r in first_gold) / len(first_gold) if first_gold else None
                for k in ks})
    return out


def retrieval_table(rows: list[dict], ks: tuple[int, ...] = RETRIEVAL_KS) -> str:
    """The rows side by side as a Markdown table (n/a: no question names a gold passage)."""
    head = ["index", "backend", "docs", "questions", *(f"top-{k} acc" for k in ks), *(f"gold R@{k}" for k in ks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["index"], r["backend"], str(r["docs"]), str(r["questions"])]
        cells += [f"{r[f'top_{k}_accuracy']:.3f}" for k in ks]
        cells += ["n/a" if r[f"gold_recall_at_{k}"] is None else f"{r[f'gold_recall_at_{k}']:.3f}" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_retrievers(qa_file: str | Path, index_dirs: list[str | Path], out: str | Path,
                       ks: tuple[int, ...] = RETRIEVAL_KS, hybrid_weight: float | None = None) -> tuple[list[dict], str]:
    """`realm-hpc evaluate --qa FILE --index DIR [--index DIR ...] [--hybrid]`: every index on the same questions, no
    reader; with `hybrid_weight`, one more row per (dense, BM25) pair of them: their score fusion
    (retrieval/hybrid.py, that weight on the dense side). Writes the rows to the JSON file ``out`` (atomically);
    returns them and their Markdown table."""
    from realm_hpc.retrieval.hybrid import DEPTH, HybridIndex

    examples = read_qa(qa_file)  # every line checked before any index is opened
    indexes = [open_index(d) for d in index_dirs]  # every index checked before any search
    if hybrid_weight is not None:
        sparse = [i for i in indexes if i.meta["backend"] == "bm25"]
        dense = [i for i in indexes if i.meta["backend"] != "bm25"]
        if not (sparse and dense):
            raise ValueError("--hybrid fuses a dense and a BM25 index: give at least one --index of each")
        indexes += [HybridIndex(d, b, hybrid_weight) for d in dense for b in sparse]
    for index in indexes:
        index.require_texts()
    rows = [retrieval_accuracy(index, examples, ks) for index in indexes]
    atomic_write_json(Path(out), {"qa_file": str(qa_file), "questions": len(examples), "ks": list(ks),
                                  "top_k_accuracy": "DPR's: some top-k passage's text contains an answer "
                                                    "(realm_hpc.data.qa.has_answer)",
                                  "gold_recall_at_k": "a gold passage id (gold_id / positive_ctxs) is in the top k, "
                                                      "over the questions that name one",
                                  "hybrid": None if hybrid_weight is None else
                                  f"per question, each index's top {DEPTH} min-max "
                                  f"normalised, {hybrid_weight:g} x dense + {1 - hybrid_weight:g} x bm25",
                                  "rows": rows})
    return rows, retrieval_table(rows, ks)
