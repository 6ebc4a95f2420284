"""Dense + BM25 score fusion: what `evaluate --qa FILE --index DENSE --index BM25 --hybrid` adds as a row.

The two scores live on different scales (a dense index: 20 x a cosine; BM25: a sum of idf-weighted term scores that
grows with the query's length), so each retriever's top-`depth` list is min-max normalised per query first (its best
document 1, its depth-th 0; a document missing from a list scores 0 there, i.e. no better than the list's last), then
fused = weight * dense + (1 - weight) * bm25, ties to the lower row. One search of each index per question.
"""

from __future__ import annotations

import numpy as np

DEPTH = 100  # documents taken from each retriever per query


def _normalised(scores: np.ndarray) -> np.ndarray:
    lo, hi = scores.min(axis=1, keepdims=True), scores.max(axis=1, keepdims=True)
    return np.where(hi > lo, (scores - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0)


def fuse(a_scores: np.ndarray, a_rows: np.ndarray, b_scores: np.ndarray, b_rows: np.ndarray, k: int,
         weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(fused scores float32 [B, k], rows int64 [B, k]) best first, from two retrievers' (scores, rows) [B, D_a] and
    [B, D_b], each best first: weight x a's min-max normalised score + (1 - weight) x b's."""
    a_norm, b_norm = _normalised(a_scores.astype(np.float64)), _normalised(b_scores.astype(np.float64))
    out_scores = np.zeros((len(a_rows), k), dtype=np.float32)
    out_rows = np.zeros((len(a_rows), k), dtype=np.int64)
    for q in range(len(a_rows)):
        fused: dict[int, float] = {}
        for rows, norm, w in ((a_rows[q], a_norm[q], weight), (b_rows[q], b_norm[q], 1.0 - weight)):
            for r, s in zip(rows.tolist(), norm.tolist()):
                fused[r] = fused.get(r, 0.0) + w * s
        best = sorted(fused.items(), key=lambda rs: (-rs[1], rs[0]))[:k]
        out_rows[q, :len(best)] = [r for r, _ in best]
        out_scores[q, :len(best)] = [s for _, s in best]
    return out_scores, out_rows


class HybridIndex:
    """A dense index directory and a BM25 one over the same documents in the same order, searched as one: answers
    what `evaluate.retrieval_accuracy` asks of an index (path, meta, len, doc_ids, text, search_rows)."""

    def __init__(self, dense, sparse, weight: float = 0.5, depth: int = DEPTH):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"--hybrid-weight must be in [0, 1], got {weight}")
        same = len(dense) == len(sparse) and all(
            np.array_equal(getattr(dense.doc_ids, name), getattr(sparse.doc_ids, name)) for name in ("data", "offsets"))
        if not same:
            raise ValueError(f"{dense.path} and {sparse.path}: a hybrid needs two indexes of the same documents in the "
                             "same order (build both from one run or one corpus file)")
        self.dense, self.sparse, self.weight, self.depth = dense, sparse, weight, min(depth, len(dense))
        self.path = f"{dense.path} + {sparse.path}"
        self.meta = {"backend": f"hybrid: {weight:g} {dense.meta['backend']} + {1 - weight:g} bm25"}
        self.doc_ids, self.titles = dense.doc_ids, dense.titles

    def __len__(self) -> int:
        return len(self.dense)

    def require_texts(self) -> None:
        self.sparse.require_texts()

    def text(self, row: int) -> str:
        return self.sparse.text(row)

    def search_rows(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        a = self.dense.search_rows(questions, self.depth)
        b = self.sparse.search_rows(questions, self.depth)
        return fuse(*a, *b, min(k, len(self)), self.weight)
