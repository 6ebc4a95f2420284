"""Held-out evaluation: recall@k of the gold document, the share of masked spans a retrieved document holds, and
exact-token MLM accuracy on salient spans."""

from __future__ import annotations

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


def recall_at_k(model: Realm, data: PretrainData, index: LiveIndex, k: int, batch_size: int = 64) -> float:
    """Share of held-out masked examples whose gold document (never the excluded source) is in the top k."""
    hits = [bool(set(row) & set(e.gold)) for e, row in _retrieved(model, data, index, k, batch_size) if e.gold]
    return sum(hits) / len(hits) if hits else float("nan")


def _contains(doc: np.ndarray, span: np.ndarray) -> bool:
    n = len(span)
    return n > 0 and any(np.array_equal(doc[i:i + n], span) for i in np.flatnonzero(doc == span[0]))


def span_in_top_k(model: Realm, data: PretrainData, index: LiveIndex, k: int, batch_size: int = 64) -> float:
    """Share of held-out masked examples whose span (its tokens, in order) occurs in one of the top k documents
    (title or text; the source excluded): what a reader could copy. Needs no gold annotation, so it measures
    retrieval on any corpus."""
    hits = [any(_contains(data.blocks.tokens(d)[1:], e.sentence.ids[e.span[0]:e.span[1]]) for d in row)
            for e, row in _retrieved(model, data, index, k, batch_size)]
    return sum(hits) / len(hits) if hits else float("nan")


@torch.no_grad()
def mlm_accuracy(model: Realm, data: PretrainData, index: LiveIndex | None, k: int, batch_size: int = 32) -> float:
    """Exact-token accuracy of argmax_v p(v|x), marginalised over the retrieved docs, on held-out spans."""
    was = model.training
    model.eval()
    correct, total = 0.0, 0.0
    for _, batch in data.eval_batches(batch_size):
        batch = batch.to(model.device)
        out = model(batch, data, index, k, train_retriever=False)
        pred = model.predict_tokens(out)
        correct += float(((pred == batch.targets).float() * batch.target_mask).sum())
        total += float(batch.target_mask.sum())
    model.train(was)
    return correct / total if total else float("nan")
