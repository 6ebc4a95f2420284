"""BM25 through bm25s: what a `--backend bm25` index directory searches with (store.py lays the directory out).

Lexical ranking needs no encoder and no checkpoint, which makes it the baseline users already run (DPR, Pyserini).
bm25s does the work: its tokenizer (lower-cased, scikit-learn's `\\b\\w\\w+\\b` words, an English stopword list, no
stemmer), its Lucene BM25 scoring in a sparse matrix, its save/load. A document is indexed as title + " " + text,
as Pyserini's Wikipedia indexes are; queries are tokenized the same way against the saved stopword list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s.tokenize's default (scikit-learn's CountVectorizer words)
DEFAULT_PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75}  # bm25s's defaults


def tokenization() -> dict:
    """How text becomes BM25 terms, recorded in meta.json; `tokenize` reads the stopwords back from it."""
    return {"library": f"bm25s {bm25s.__version__}", "lower": True, "token_pattern": TOKEN_PATTERN,
            "stopwords_source": f"bm25s.stopwords.STOPWORDS_EN ({len(STOPWORDS_EN)} English words)",
            "stopwords": list(STOPWORDS_EN), "stemmer": None, "indexed_text": "title + ' ' + text"}


def tokenize(texts: Sequence[str], stopwords: Sequence[str], progress: bool = False):
    return bm25s.tokenize(list(texts), lower=True, token_pattern=TOKEN_PATTERN, stopwords=list(stopwords),
                          show_progress=progress)


def build(titles: Sequence[str], texts: Sequence[str], params: dict | None = None) -> bm25s.BM25:
    """A bm25s index of title + " " + text per document, in document order (row i is document i)."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    retriever = bm25s.BM25(method=params["method"], k1=params["k1"], b=params["b"])
    corpus = [f"{title} {text}" for title, text in zip(titles, texts)]
    retriever.index(tokenize(corpus, STOPWORDS_EN, progress=True), show_progress=True)
    return retriever


def save(retriever: bm25s.BM25, path: Path) -> None:
    retriever.save(str(path), show_progress=False)


def load(path: Path) -> bm25s.BM25:
    # Memory-mapped: a large index costs page cache, not a copy per process.
    return bm25s.BM25.load(str(path), mmap=True, show_progress=False)


def search(retriever: bm25s.BM25, stopwords: Sequence[str], questions: Sequence[str],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [B, k], rows int64 [B, k]) best first. A question with no indexed term scores 0 everywhere."""
    rows, scores = retriever.retrieve(tokenize(questions, stopwords, progress=False), k=k, show_progress=False)
    return np.asarray(scores, dtype=np.float32), np.asarray(rows, dtype=np.int64)
