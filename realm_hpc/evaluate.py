"""Held-out evaluation: recall@k of the gold document, the share of masked spans a retrieved document holds, and
exact-token MLM accuracy on salient spans."""

from __future__ import annotations

import math

import numpy as np
import torch

from realm_hpc.data.examples import PretrainData
from realm_hpc.models.realm import Realm
from realm_hpc.retrieval.index import LiveIndex


@torch.no_grad()
def _retrieved(model: Realm, data: PretrainData, index: LiveIndex, k: int, batch_size: int):
    """(held-out example, its top-k block ids, source excluded) for every held-out example, queries encoded in eval
    mode. Every search is a collective on a sharded index: all trainers iterate to the end."""
    was = model.training
    model.eval()
    try:
        for examples, batch in data.eval_batches(batch_size):
            batch = batch.to(model.device)
            q = model.retriever.query(batch.query_ids, batch.query_mask)
            _, ids = index.search(q, k, batch.source)
            yield from zip(examples, ids.tolist())
    finally:
        model.train(was)


def _gold_recall(retrieved) -> float:
    hits = [bool(set(row) & set(e.gold)) for e, row in retrieved if e.gold]
    return sum(hits) / len(hits) if hits else float("nan")


def _span_hits(data: PretrainData, retrieved) -> list[bool]:
    return [any(_contains(data.blocks.tokens(d)[1:], e.sentence.ids[e.span[0]:e.span[1]]) for d in row)
            for e, row in retrieved]


def recall_at_k(model: Realm, data: PretrainData, index: LiveIndex, k: int, batch_size: int = 64) -> float:
    """Share of held-out masked examples whose gold document (never the excluded source) is in the top k."""
    return _gold_recall(_retrieved(model, data, index, k, batch_size))


def _contains(doc: np.ndarray, span: np.ndarray) -> bool:
    n = len(span)
    return n > 0 and any(np.array_equal(doc[i:i + n], span) for i in np.flatnonzero(doc == span[0]))


def spans_in_top_k(model: Realm, data: PretrainData, index: LiveIndex, k: int, batch_size: int = 64) -> list[bool]:
    """Per held-out masked example: whether its span (its tokens, in order) occurs in one of the top k documents
    (title or text; the source excluded), i.e. whether a reader could copy it. Needs no gold annotation, so it
    measures retrieval on any corpus."""
    return _span_hits(data, _retrieved(model, data, index, k, batch_size))


def retrieval_metrics(model: Realm, data: PretrainData, index: LiveIndex, k: int,
                      batch_size: int = 64) -> tuple[float, list[bool]]:
    """(recall_at_k, spans_in_top_k) from one encoding and search of the held-out queries."""
    retrieved = list(_retrieved(model, data, index, k, batch_size))
    return _gold_recall(retrieved), _span_hits(data, retrieved)


def _scored_tokens(data: PretrainData, batch_size: int = 64) -> list[int]:
    """Masked tokens scored per held-out example, in mlm_token_hits' order (a span cut by model.query_len counts
    only its kept tokens)."""
    return [int(n) for _, batch in data.eval_batches(batch_size) for n in batch.target_mask.sum(1).tolist()]


def per_token(data: PretrainData, flags: list[bool], batch_size: int = 64) -> torch.Tensor:
    """An example-level flag repeated over the example's masked tokens, in mlm_token_hits' order."""
    counts = _scored_tokens(data, batch_size)
    return torch.tensor([f for f, n in zip(flags, counts, strict=True) for _ in range(n)], dtype=torch.bool)


def per_example(data: PretrainData, token_hits: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Span hits from token hits: a held-out example (one masked span) is right when all its scored tokens are.
    The unit the paired test counts: a span's tokens are not independent trials (get "Kessler" right and its
    "##ler" follows). An example with no scored token (cut away by model.query_len) is right for no model."""
    counts = _scored_tokens(data, batch_size)
    if sum(counts) != len(token_hits):
        raise ValueError(f"{len(token_hits)} token hits for {sum(counts)} held-out masked tokens")
    return torch.tensor([n > 0 and bool(h.all()) for h, n in zip(torch.split(token_hits, counts), counts)],
                        dtype=torch.bool)


@torch.no_grad()
def mlm_token_hits(model: Realm, data: PretrainData, index: LiveIndex | None, k: int,
                   batch_size: int = 32) -> torch.Tensor:
    """Whether argmax_v p(v|x), marginalised over the retrieved docs, is the masked token: one bool per held-out
    masked token, always in the same order, so two models' hits pair up (per_example groups them by held-out span for
    paired_sign_test)."""
    was = model.training
    model.eval()
    hits = []
    for _, batch in data.eval_batches(batch_size):
        batch = batch.to(model.device)
        pred = model.predict_tokens(model(batch, data, index, k, train_retriever=False))
        hits.append((pred == batch.targets)[batch.target_mask.bool()].cpu())
    model.train(was)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def share(flags: list[bool] | torch.Tensor) -> float:
    """The share of True in hits or flags (mlm_token_hits, spans_in_top_k, or a slice of them); nan when empty."""
    return torch.as_tensor(flags, dtype=torch.bool).float().mean().item() if len(flags) else float("nan")


def mlm_accuracy(model: Realm, data: PretrainData, index: LiveIndex | None, k: int, batch_size: int = 32) -> float:
    """Exact-token accuracy of argmax_v p(v|x), marginalised over the retrieved docs, on held-out spans."""
    return share(mlm_token_hits(model, data, index, k, batch_size))


def paired_sign_test(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, float]:
    """McNemar's exact test on two models' hits over the same trials, which must be independent: pass per-example
    hits (`per_example`), not tokens. Returns (trials only a gets right, trials only b gets right, the two-sided
    p-value of that split if a and b were equally accurate: a fair-coin binomial tail)."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return only_a, only_b, min(1.0, 2 * tail)
