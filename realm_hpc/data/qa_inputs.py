"""Reader inputs for Open-QA: `[CLS] q [SEP] z [SEP]` rows, every candidate answer span of z, and which spans match
a gold answer after SQuAD/DPR normalisation.

Spans live in the passage's own characters: a candidate is a token range of the block, read as the character range
that the tokenizer's offsets give in the block's title or text (`BlockStore.token_chars`). Its normalised text is
`normalize_answer` of those characters, so "1,000", "Jean-Paul", "U.S.", "3.5", "Cupertino, California" and
"Gödel" match their gold answers (joining word pieces with spaces would give "1 , 000"), and a prediction is that
exact substring of the passage: the original case and accents even from an uncased tokenizer.

A candidate covers 1..max_len tokens of the title or of the text, starts at a word start and ends at a word end
(never inside a `##` piece), neither starts nor ends on a token that normalisation drops (punctuation, a/an/the:
"the Paris ." would only duplicate "Paris"); an abbreviation keeps its last period ("U.S." not "U.S"). Each block's
candidates and their normalised strings are computed once and cached: matching a question's answers is then a set
lookup per span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from realm_hpc.data.qa import normalize_answer

# A word of letter-period pairs ("U.S", "D.C", "J.R.R") before its final period: the period belongs to it ("3.5." not).
_ABBREVIATION = re.compile(r"(?:^|[\s(\[\"'])(?:[^\W\d_]\.)+[^\W\d_]$")


@dataclass
class BlockSpans:
    starts: np.ndarray  # [S] inclusive token positions in the block ([CLS] title [SEP] text [SEP])
    ends: np.ndarray  # [S] inclusive
    norm: list[str]  # normalised text of each span


def span_chars(source: str, chars: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """[a, b) characters of `source` (the block's title or text) that tokens start..end (inclusive) cover; an
    abbreviation's final period is added ("U.S." has tokens u . s . and a span may not end on the dropped ".")."""
    a, b = int(chars[start, 0]), int(chars[end, 1])
    if source[b:b + 1] == "." and _ABBREVIATION.search(source, 0, b):
        b += 1
    return a, b


@dataclass
class ReaderBatch:
    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    starts: torch.Tensor  # [N, S] row positions (0 where padded)
    ends: torch.Tensor
    valid: torch.Tensor  # [N, S] bool
    match: torch.Tensor  # [N, S] bool: the span's normalised text is a normalised gold answer
    span_tokens: list[list[tuple[int, int]]]  # per row: (block start, block end) of each candidate (span_text)

    def to(self, device: torch.device | str) -> "ReaderBatch":
        """The tensors on `device`; itself when already there."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        return ReaderBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.token_type_ids,
                                                    self.starts, self.ends, self.valid, self.match)),
                           self.span_tokens)


class QAInputs:
    def __init__(self, tokenizer, blocks, reader_len: int, query_len: int, max_span_len: int):
        self.tokenizer, self.blocks = tokenizer, blocks
        self.reader_len, self.query_len, self.max_span_len = reader_len, query_len, max_span_len
        self.cls_id, self.sep_id, self.pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self._pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._cache: dict[int, BlockSpans] = {}

    # -- questions --------------------------------------------------------------------------------------------------
    def questions(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """`[CLS] q [SEP]` for the query encoder, padded."""
        return self.tokenizer(texts, truncation=True, max_length=self.query_len, padding=True, return_tensors="pt")

    @staticmethod
    def question_tokens(enc: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """q's tokens without [CLS]/[SEP], from `questions()`."""
        out = []
        for ids, mask in zip(enc["input_ids"].numpy(), enc["attention_mask"].numpy()):
            out.append(ids[1:int(mask.sum()) - 1].astype(np.int64))
        return out

    # -- spans ----------------------------------------------------------------------------------------------------
    def span_text(self, block: int, start: int, end: int) -> str:
        """The passage's own characters that the block's tokens start..end (inclusive) cover: a prediction."""
        source = self.blocks.title(block) if start <= self.blocks.title_len(block) else self.blocks.text(block)
        a, b = span_chars(source, self.blocks.token_chars(block), start, end)
        return source[a:b]

    def block_spans(self, block: int) -> BlockSpans:
        if block in self._cache:
            return self._cache[block]
        toks, chars, title_len = self.blocks.tokens(block), self.blocks.token_chars(block), self.blocks.title_len(block)
        title, text = self.blocks.title(block), self.blocks.text(block)
        n = len(toks)
        # [CLS], the title's [SEP] and the last [SEP] by position: an [UNK] inside the text is still a word.
        special = np.zeros(n, dtype=bool)
        special[[0, title_len + 1, n - 1]] = True
        sources = [title if p <= title_len else text for p in range(n)]
        cont = np.array([self._pieces[int(t)].startswith("##") for t in toks])
        dropped = np.array([special[p] or not normalize_answer(sources[p][chars[p, 0]:chars[p, 1]])
                            for p in range(n)])
        starts, ends, norm = [], [], []
        for i in range(n):
            if special[i] or cont[i] or dropped[i]:
                continue
            for j in range(i, min(n, i + self.max_span_len)):
                if special[j]:
                    break
                if (j + 1 < n and cont[j + 1]) or dropped[j]:
                    continue  # a span ends at a word end, on a word
                a, b = span_chars(sources[i], chars, i, j)
                text_ij = normalize_answer(sources[i][a:b])
                if text_ij:
                    starts.append(i), ends.append(j), norm.append(text_ij)
        spans = BlockSpans(np.asarray(starts, np.int64), np.asarray(ends, np.int64), norm)
        self._cache[block] = spans
        return spans

    def contains_answer(self, block: int, answers: set[str]) -> bool:
        """Whether a candidate span of the block is a (normalised) gold answer: what the loss can learn from.
        "A top-k passage contains an answer" as a metric is DPR's rule instead (`data.qa.has_answer`)."""
        return any(s in answers for s in self.block_spans(block).norm)

    # -- reader rows -------------------------------------------------------------------------------------------------
    def reader_batch(self, q_tokens: list[np.ndarray], doc_ids: torch.Tensor, answers: list[set[str]]) -> ReaderBatch:
        """One row per (question, retrieved block); doc_ids [B, K]; answers: normalised gold answers per question."""
        B, K = doc_ids.shape
        L = self.reader_len
        rows, types, cand, spans_out, matches = [], [], [], [], []
        for b in range(B):
            head = np.concatenate([[self.cls_id], q_tokens[b][: self.query_len - 2], [self.sep_id]]).astype(np.int64)
            for d in doc_ids[b].tolist():
                z = np.array(self.blocks.tokens(d)[1:], dtype=np.int64)[: L - len(head)]
                z[-1] = self.sep_id
                rows.append(np.concatenate([head, z]))
                types.append(len(head))
                sp = self.block_spans(d)
                keep = sp.ends < len(z)  # block position p sits at row position len(head) + p - 1; z[-1] is [SEP]
                starts, ends = sp.starts[keep], sp.ends[keep]
                cand.append((starts + len(head) - 1, ends + len(head) - 1))
                spans_out.append(list(zip(starts.tolist(), ends.tolist())))
                matches.append([t in answers[b] for t, k in zip(sp.norm, keep) if k])
        width = max(len(r) for r in rows)
        S = max(1, max(len(s) for s, _ in cand))
        N = len(rows)
        input_ids = torch.full((N, width), self.pad_id, dtype=torch.long)
        type_ids = torch.zeros_like(input_ids)
        starts = torch.zeros(N, S, dtype=torch.long)
        ends = torch.zeros(N, S, dtype=torch.long)
        valid = torch.zeros(N, S, dtype=torch.bool)
        match = torch.zeros(N, S, dtype=torch.bool)
        for i, (r, head_len, (s, e), m) in enumerate(zip(rows, types, cand, matches)):
            input_ids[i, : len(r)] = torch.from_numpy(r)
            type_ids[i, head_len: len(r)] = 1
            starts[i, : len(s)] = torch.from_numpy(s)
            ends[i, : len(e)] = torch.from_numpy(e)
            valid[i, : len(s)] = True
            match[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return ReaderBatch(input_ids, (input_ids != self.pad_id).long(), type_ids, starts, ends, valid, match,
                           spans_out)

    # -- closed book ---------------------------------------------------------------------------------------------------
    def closed_book_batch(self, q_tokens: list[np.ndarray], answers: list[str] | None = None) -> dict:
        """`[CLS] q [SEP] [MASK]*m [SEP]` (m = max_span_len): the MLM reader fills in the answer's tokens followed
        by [SEP] (the end marker), without any document."""
        m = self.max_span_len
        B = len(q_tokens)
        heads = [np.concatenate([[self.cls_id], q[: self.query_len - 2], [self.sep_id]]) for q in q_tokens]
        width = max(len(h) for h in heads) + m + 1
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(B, m, dtype=torch.long)
        targets = torch.zeros(B, m, dtype=torch.long)
        target_mask = torch.zeros(B, m)
        for b, h in enumerate(heads):
            row = np.concatenate([h, [self.mask_id] * m, [self.sep_id]]).astype(np.int64)
            input_ids[b, : len(row)] = torch.from_numpy(row)
            positions[b] = torch.arange(len(h), len(h) + m)
            if answers is not None:
                ans = self.tokenizer(answers[b], add_special_tokens=False)["input_ids"][:m]
                tgt = (ans + [self.sep_id])[:m]
                targets[b, : len(tgt)] = torch.tensor(tgt)
                target_mask[b, : len(tgt)] = 1.0
        attention = (input_ids != self.pad_id).long()
        return dict(input_ids=input_ids, attention_mask=attention, token_type_ids=torch.zeros_like(input_ids),
                    positions=positions, targets=targets, target_mask=target_mask,
                    doc_mask=torch.zeros_like(input_ids, dtype=torch.bool))

    def closed_book_answer(self, predicted: list[int]) -> str:
        """The closed-book reader's answer: its tokens up to the end marker, decoded (`detokenize`)."""
        out = []
        for t in predicted:
            if t == self.sep_id:
                break
            out.append(t)
        return detokenize(self.tokenizer.decode(out, clean_up_tokenization_spaces=False))


# WordPiece keeps no whitespace: BERT's pre-tokenizer splits off every punctuation mark, and decode() puts a space
# between all words ("1 , 000", "jean - paul", "u . s ."). A decoder can only guess where the spaces were; English
# almost never has one before , . ; : ! ? % ) ] or after ( [ $ £ €, nor around - – / or an inner apostrophe, nor
# inside an abbreviation ("u.s."); a period between digits, or a comma before three, is a number's. An uncased
# vocabulary has lost case and accents for good: EM forgives the case, not "godel" for "Gödel" (the open-book reader
# has no such loss: it answers in passage text).
_DETOKENIZE = [
    (re.compile(r"\s+([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$£€])\s+"), r"\1"),
    (re.compile(r"(\d),\s+(?=\d{3}(?!\d))"), r"\1,"),  # "1, 000" is 1,000; "April 1, 1976" stays
    (re.compile(r"(\d)\.\s+(?=\d)"), r"\1."),
    (re.compile(r"\b([^\W\d_])\.\s+(?=[^\W\d_]\.)"), r"\1."),  # "u. s." -> "u.s."
    (re.compile(r"\s*([-–—/])\s*"), r"\1"),
    (re.compile(r"(\w)\s*(['’])\s*(?=\w)"), r"\1\2"),
]


def detokenize(text: str) -> str:
    """`tokenizer.decode` output with the spaces WordPiece put around punctuation taken out: "1 , 000" -> "1,000",
    "jean - paul" -> "jean-paul", "u . s ." -> "u.s.", "o ' brien" -> "o'brien"."""
    for pattern, repl in _DETOKENIZE:
        text = pattern.sub(repl, text)
    return text.strip()
