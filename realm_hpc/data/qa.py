"""Open-QA data: DPR `*.qa.csv` and JSONL readers, SQuAD/DPR answer normalisation, exact match, and questions
generated from the embedded fact world.

A malformed line is a one-line `CorpusFormatError` starting with `path:lineno: `, as for corpora.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import regex

from realm_hpc.data.corpus import CorpusFormatError, _lines, _snippet, atomic_file
from realm_hpc.data.world import World


@dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]
    fact_id: int = -1  # the world fact it asks about (-1 for a file that is not from the world)
    gold_ids: tuple[str, ...] = ()  # ids of passages that answer it (JSONL "gold_id" or DPR's "positive_ctxs")


# -- normalisation (SQuAD v1.1 evaluate script, also DPR's) ------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


# -- "a passage contains an answer" (DPR's has_answer, match_type="string") ------------------------------------------
# DPR's SimpleTokenizer: runs of letters, digits and combining marks, or any other single non-space character.
# After NFD an accented letter is a letter plus a combining mark, so "Gödel" stays one token.
_DPR_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", regex.UNICODE)


def dpr_tokens(text: str) -> list[str]:
    """DPR's SimpleTokenizer words of `text`, NFD-normalised and lower-cased (its `words(uncased=True)`)."""
    return [t.lower() for t in _DPR_TOKEN.findall(unicodedata.normalize("NFD", text))]


def has_answer(text: str, answers: Iterable[str]) -> bool:
    """DPR's rule for "this passage contains an answer": some answer's token sequence occurs in the passage's token
    sequence (SimpleTokenizer, NFD, uncased; punctuation marks are tokens of their own, so "1,000" matches "1,000"
    but not "1000", and "Paris" does not match inside "Parisian")."""
    words = dpr_tokens(text)
    for answer in answers:
        a = dpr_tokens(answer)
        if a and any(words[i:i + len(a)] == a for i in range(len(words) - len(a) + 1)):
            return True
    return False


# -- readers -------------------------------------------------------------------------------------------------------
def _answers(path: Path, lineno: int, value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(a, str) for a in value):
        got = _snippet(repr(value))
        raise CorpusFormatError(path, lineno, f"answers must be a non-empty list of strings, got {got}")
    if not any(normalize_answer(a) for a in value):
        raise CorpusFormatError(path, lineno, "every answer is empty after normalisation")
    return tuple(value)


def _parse_csv_line(path: Path, lineno: int, line: str) -> QAExample:
    # DPR's nq-test.qa.csv: `question<TAB>['answer', ...]`, no header, no quoting of the question.
    if "\t" not in line:
        raise CorpusFormatError(path, lineno, f"expected question<TAB>['answer', ...], got {_snippet(line)}")
    question, raw = line.rsplit("\t", 1)
    if not question.strip():
        raise CorpusFormatError(path, lineno, "empty question")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise CorpusFormatError(path, lineno, f"answers are not a Python-literal list: {_snippet(raw)}") from None
    return QAExample(question.strip(), _answers(path, lineno, value))


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> QAExample:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(path, lineno, f"invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or "answers" not in obj:
        raise CorpusFormatError(path, lineno, 'expected {"question": str, "answers": [str, ...]}')
    if not obj["question"].strip():
        raise CorpusFormatError(path, lineno, "empty question")
    fact = obj.get("fact_id", -1)
    return QAExample(obj["question"].strip(), _answers(path, lineno, obj["answers"]), int(fact),
                     _gold_ids(path, lineno, obj))


# DPR's retriever data name a positive passage's id "passage_id" (biencoder-nq-*.json) or "psg_id"
_CTX_ID_KEYS = ("passage_id", "psg_id", "id")


def _gold_ids(path: Path, lineno: int, obj: dict) -> tuple[str, ...]:
    """Gold passage ids: "gold_id" (one id or a list), or the ids of DPR's "positive_ctxs"; () when neither."""
    if "gold_id" in obj:
        value = obj["gold_id"]
        ids = value if isinstance(value, list) else [value]
    elif "positive_ctxs" in obj:
        ctxs = obj["positive_ctxs"]
        if not isinstance(ctxs, list) or not all(isinstance(c, dict) for c in ctxs):
            raise CorpusFormatError(path, lineno, "'positive_ctxs' must be a list of objects")
        ids = []
        for c in ctxs:
            key = next((k for k in _CTX_ID_KEYS if k in c), None)
            if key is None:
                raise CorpusFormatError(path, lineno, f"a positive_ctxs entry has no id ({', '.join(_CTX_ID_KEYS)})")
            ids.append(c[key])
    else:
        return ()
    if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
        raise CorpusFormatError(path, lineno,
                                f"gold passage ids must be strings or integers, got {_snippet(repr(ids))}")
    return tuple(str(i).strip() for i in ids)


def read_qa(path: str | os.PathLike) -> list[QAExample]:
    """Questions and gold answers from a DPR `.csv`/`.tsv` (tab-separated) or a `.jsonl` file (optionally .gz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such QA file")
    name = path.name.removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        parse = _parse_csv_line
    elif name.endswith((".jsonl", ".json")):
        parse = _parse_jsonl_line
    else:
        raise ValueError(f"{path}: unknown QA format (expected .qa.csv, .tsv or .jsonl)")
    out = [parse(path, lineno, line) for lineno, line in _lines(path) if line.strip()]
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def write_qa_jsonl(examples: Iterable[QAExample], path: str | os.PathLike) -> Path:
    with atomic_file(path) as f:
        for e in examples:
            f.write(json.dumps({"question": e.question, "answers": list(e.answers), "fact_id": e.fact_id}) + "\n")
    return Path(path)


# -- questions from the embedded fact world ----------------------------------------------------------------------
QUESTION_TEMPLATES = {
    "born": ["When was {s} born?", "In which year was {s} born?", "What year was {s} born in?"],
    "birthplace": ["Where did {s} grow up?", "What is the birthplace of {s}?", "Which town did {s} come from?"],
    "employer": ["Who employed {s}?", "Which organisation did {s} work for?", "Where did {s} work?"],
    "population": ["What is the population of {s}?", "How many people live in {s}?"],
    "founded": ["When was {s} founded?", "In which year was {s} established?"],
    "seat": ["Where is {s} based?", "In which town does {s} have its seat?"],
}


def world_questions(world: World, dev_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                    phrasings_per_fact: int = 1) -> dict[str, list[QAExample]]:
    """train/dev/test questions over disjoint sets of facts; each fact gets `phrasings_per_fact` phrasings drawn
    from its relation's templates (a fact's questions all stay in its split)."""
    rng = random.Random(seed)
    facts = list(world.facts)
    rng.shuffle(facts)
    n_dev, n_test = int(len(facts) * dev_fraction), int(len(facts) * test_fraction)
    parts = {"dev": facts[:n_dev], "test": facts[n_dev:n_dev + n_test], "train": facts[n_dev + n_test:]}
    out = {}
    for split, chosen in parts.items():
        examples = []
        for f in sorted(chosen, key=lambda f: f.id):
            templates = QUESTION_TEMPLATES[f.relation]
            for t in rng.sample(templates, min(phrasings_per_fact, len(templates))):
                examples.append(QAExample(t.format(s=f.subject), (f.value,), f.id))
        rng.shuffle(examples)
        out[split] = examples
    return out
