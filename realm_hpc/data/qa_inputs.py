"""Reader inputs for Open-QA: `[CLS] q [SEP] z [SEP]` rows, every candidate answer span of z, and which spans match
a gold answer after SQuAD/DPR normalisation.

A candidate span covers 1..max_len tokens of the block (title or text), starts at a word start and ends at a word
end (never inside a `##` piece), neither starts nor ends on a token that normalisation drops (punctuation, a/an/the:
"the Paris ." would only duplicate "Paris"). Each block's candidates and their normalised strings are computed once
and cached: matching a question's answers is then a set lookup per span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from realm_hpc.data.qa import normalize_answer


@dataclass
class BlockSpans:
    starts: np.ndarray  # [S] inclusive token positions in the block ([CLS] title [SEP] text [SEP])
    ends: np.ndarray  # [S] inclusive
    norm: list[str]  # normalised text of each span


@dataclass
class ReaderBatch:
    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    starts: torch.Tensor  # [N, S] row positions (0 where padded)
    ends: torch.Tensor
    valid: torch.Tensor  # [N, S] bool
    match: torch.Tensor  # [N, S] bool: the span's normalised text is a normalised gold answer
    span_tokens: list[list[tuple[int, int]]]  # per row: (block start, block end) of each candidate, for decoding

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
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._pieces = vocab
        self._special = set(tokenizer.all_special_ids)
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
    def span_text(self, ids) -> str:
        words: list[str] = []
        for t in ids:
            piece = self._pieces[int(t)]
            if piece.startswith("##") and words:
                words[-1] += piece[2:]
            else:
                words.append(piece)
        return " ".join(words)

    def block_spans(self, block: int) -> BlockSpans:
        if block in self._cache:
            return self._cache[block]
        toks = self.blocks.tokens(block)
        n = len(toks)
        special = np.array([int(t) in self._special for t in toks])
        cont = np.array([self._pieces[int(t)].startswith("##") for t in toks])
        dropped = np.array([not normalize_answer(self._pieces[int(t)]) for t in toks])
        starts, ends, norm = [], [], []
        for i in range(n):
            if special[i] or cont[i] or dropped[i]:
                continue
            for j in range(i, min(n, i + self.max_span_len)):
                if special[j]:
                    break
                if (j + 1 < n and cont[j + 1]) or dropped[j]:
                    continue  # a span ends at a word end, on a word
                text = normalize_answer(self.span_text(toks[i:j + 1]))
                if text:
                    starts.append(i), ends.append(j), norm.append(text)
        spans = BlockSpans(np.asarray(starts, np.int64), np.asarray(ends, np.int64), norm)
        self._cache[block] = spans
        return spans

    def contains_answer(self, block: int, answers: set[str]) -> bool:
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

    def decode(self, block: int, start: int, end: int) -> str:
        return self.tokenizer.decode(self.blocks.tokens(block)[start:end + 1].tolist())

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
        out = []
        for t in predicted:
            if t == self.sep_id:
                break
            out.append(t)
        return self.tokenizer.decode(out)
