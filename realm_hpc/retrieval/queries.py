"""`realm-hpc retrieve --queries FILE`: a batch of questions in, one JSON line of top-k results per question out.

Input: `.jsonl` / `.jsonl.gz`, one object per line with the question under "question", "query" or "text" and an
optional "id" (string or integer); any other file is plain text, one question per line. Blank lines are skipped;
an id defaults to the line number. A malformed line is a CorpusFormatError `path:line: reason`.

Output, one line per question, in input order:
    {"id": ..., "question": ..., "doc_ids": [...], "titles": [...], "scores": [...]}   (best first)
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from realm_hpc.data.corpus import CorpusFormatError, _lines, atomic_file, json_object

QUESTION_KEYS = ("question", "query", "text")


@dataclass(frozen=True)
class Query:
    id: str | int
    question: str


def read_queries(path: str | Path) -> list[Query]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such queries file")
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    out = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        out.append(_parse_json(path, lineno, line) if jsonl else Query(lineno, line.strip()))
    if not out:
        raise ValueError(f"{path}: no queries")
    return out


def _parse_json(path: Path, lineno: int, line: str) -> Query:
    obj = json_object(path, lineno, line)
    key = next((k for k in QUESTION_KEYS if k in obj), None)
    if key is None:
        raise CorpusFormatError(path, lineno, f"no question: expected one of {', '.join(map(repr, QUESTION_KEYS))}")
    question = obj[key]
    if not isinstance(question, str) or not question.strip():
        raise CorpusFormatError(path, lineno, f"{key!r} must be a non-empty string")
    qid = obj.get("id", lineno)
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise CorpusFormatError(path, lineno, f"'id' must be a string or an integer, got {type(qid).__name__}")
    return Query(qid, question.strip())


def write_results(index, queries: list[Query], k: int, batch_size: int, out: str | Path | None) -> None:
    """Search ``queries`` against an index directory (store.open_index: dense or bm25) in batches; JSONL to ``out``
    (atomically) or stdout."""
    with (atomic_file(out) if out else contextlib.nullcontext(sys.stdout)) as f:
        for a in range(0, len(queries), batch_size):
            chunk = queries[a:a + batch_size]
            for q, hits in zip(chunk, index.search([q.question for q in chunk], k)):
                doc_ids, titles, scores = zip(*hits)
                f.write(json.dumps({"id": q.id, "question": q.question, "doc_ids": list(doc_ids),
                                    "titles": list(titles), "scores": list(scores)}, ensure_ascii=False) + "\n")
        f.flush()
