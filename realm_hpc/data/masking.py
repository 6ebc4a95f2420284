"""Salient-span masking (REALM §3.4): mask a named entity, a date or a number, so the masked token needs world
knowledge rather than syntax. Spans are found by a small heuristic (capitalised spans, years, numbers);
sentences without one fall back to random-token masking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_SALIENT = re.compile(
    rf"\b\d{{1,2}} (?:{_MONTHS}) \d{{3,4}}\b"  # dates: 12 March 1843
    rf"|\b(?:{_MONTHS}) \d{{1,2}}, \d{{3,4}}\b"  # March 12, 1843
    r"|\b\d{1,3}(?:,\d{3})+(?:\.\d+)?\b|\b\d+(?:\.\d+)?\b"  # numbers and years
    r"|\b(?:[A-Z]\.|[A-Z][\w'-]*)(?:\s+(?:[A-Z]\.|[A-Z][\w'-]*|of|de|von|van)(?=\s+[A-Z]|\b))*"
)


def salient_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of salient candidates. A lone capitalised word that opens the sentence is skipped: it is
    capitalised by position, not because it names something."""
    spans = []
    for m in _SALIENT.finditer(text):
        start, end = m.span()
        value = m.group(0)
        if value.startswith(("The ", "A ", "An ")):  # an article opening the sentence is not part of the name
            cut = value.index(" ") + 1
            start, value = start + cut, value[cut:]
        if start == 0 and " " not in value and not value[0].isdigit():
            continue
        spans.append((start, end))
    return spans


@dataclass
class TokenizedSentence:
    ids: np.ndarray  # int32 token ids, no special tokens
    offsets: np.ndarray  # [n, 2] character offsets of each token
    spans: list[tuple[int, int]]  # salient spans as token ranges [start, end)


def char_to_token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    """Tokens that overlap the character span [start, end)."""
    hit = np.nonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))[0]
    if len(hit) == 0:
        return None
    return int(hit[0]), int(hit[-1]) + 1


def tokenize_sentences(tokenizer, texts: list[str], max_len: int) -> list[TokenizedSentence]:
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_len - 2)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        spans = [s for s in (char_to_token_span(offsets, a, b) for a, b in salient_spans(text)) if s]
        out.append(TokenizedSentence(np.asarray(ids, dtype=np.int32), offsets, spans))
    return out


def mask_sentence(sent: TokenizedSentence, mask_id: int, rng: np.random.Generator,
                  span: tuple[int, int] | None = None, max_span_tokens: int = 8,
                  random_rate: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (masked ids, masked positions, target ids). With `span` given (token range), masks exactly it;
    otherwise a random salient span, or random tokens when the sentence has none."""
    ids = sent.ids.copy()
    n = len(ids)
    if span is None:
        candidates = [s for s in sent.spans if s[1] - s[0] <= max_span_tokens and s[1] - s[0] < n]
        if candidates:
            span = candidates[rng.integers(len(candidates))]
    if span is not None:
        positions = np.arange(span[0], span[1])
    else:
        count = max(1, int(round(random_rate * n)))
        positions = np.sort(rng.choice(n, size=min(count, n), replace=False))
    targets = ids[positions].copy()
    ids[positions] = mask_id
    return ids, positions, targets
