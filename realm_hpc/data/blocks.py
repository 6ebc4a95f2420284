"""The block store: every document tokenized once into `[CLS] title [SEP] text [SEP]`, kept in flat memory-mapped
arrays so that millions of blocks cost page cache, not Python objects, and every rank shares one copy.

Layout of a store directory (all arrays are `.npy`, opened with `mmap_mode="r"`):
    tokens.npy          int32 [T]     all blocks back to back
    offsets.npy         int64 [N+1]   block i is tokens[offsets[i]:offsets[i+1]]
    title_len.npy       int32 [N]     title tokens in block i (without [CLS]/[SEP]); the text starts after them
    titles.npy          uint8 [*]     UTF-8 titles back to back, cut by titles_offsets.npy  int64 [N+1]
    doc_ids.npy         uint8 [*]     UTF-8 ids back to back, cut by doc_ids_offsets.npy    int64 [N+1]
    texts.npy           uint8 [*]     UTF-8 text each block covers (up to its last kept token), cut by texts_offsets.npy
    token_chars.npy     int32 [T, 2]  each token's [start, end) characters in its own title or text; (0, 0) for
                                      [CLS]/[SEP]. Open-QA reads answers in the passage's own characters through it
    meta.json           format, version, count, num_tokens, max_len, vocab_size, tokenizer, special ids, docs_cut

Segment ids are not stored: `[CLS] title [SEP]` is segment 0 and `text [SEP]` segment 1 (BERT's sentence-pair
convention, as in HF's REALM embedder); they follow from title_len; `batch(..., token_type_ids=True)` adds them.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from realm_hpc.data.corpus import Doc, atomic_dir

FORMAT, VERSION = "realm-hpc-blocks", 2  # v2 added texts and token_chars; v1 stores still open


class _NpyAppender:
    """A `.npy` file of rows written chunk by chunk, so a build never holds all tokens in memory (1-D, or rows of
    `width` values).

    numpy pads every header so that the first axis can grow to 21 digits in place; we write the header for
    length 0, append raw data, and rewrite the header with the final length over the same bytes.
    """

    def __init__(self, path: Path, dtype, width: int | None = None):
        self.dtype, self.size, self.width = np.dtype(dtype), 0, width
        self._f = open(path, "wb")
        self._header_len = self._write_header()

    def _write_header(self) -> int:
        self._f.seek(0)
        shape = (self.size,) if self.width is None else (self.size, self.width)
        header = {"descr": self.dtype.str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self._f, header)
        return self._f.tell()

    def append(self, values) -> None:
        a = np.ascontiguousarray(values, dtype=self.dtype)
        self._f.write(a.tobytes())
        self.size += a.size // (self.width or 1)

    def __enter__(self) -> _NpyAppender:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None and self._write_header() != self._header_len:
                raise RuntimeError("npy header changed length; the data would be misaligned")
        finally:
            self._f.close()


class _StringsAppender:
    """Strings as one UTF-8 byte array plus int64 offsets: no per-string Python object once written."""

    def __init__(self, out: Path, name: str):
        self.data = _NpyAppender(out / f"{name}.npy", np.uint8)
        self.offsets = _NpyAppender(out / f"{name}_offsets.npy", np.int64)
        self.offsets.append([0])

    def append(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        ends = self.data.size + np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self.data.append(np.frombuffer(b"".join(encoded), dtype=np.uint8))
        self.offsets.append(ends)

    def __enter__(self) -> _StringsAppender:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.data.__exit__(*exc)
        finally:
            self.offsets.__exit__(*exc)


# A block of max_len tokens never needs more than this many characters per token of a document's text (English
# runs ~4.5 per WordPiece token): the tokenizer reads a whole string even when it truncates, so a multi-megabyte
# document took ~20 s to yield its first 288 tokens.
CHARS_PER_TOKEN = 32


def max_chars(max_len: int) -> int:
    """The characters of a text that a block of max_len tokens can hold, with a wide margin."""
    return max_len * CHARS_PER_TOKEN


def _encode_chunk(docs: Sequence[Doc], tokenizer, max_len: int):
    """Token rows `[CLS] title [SEP] text [SEP]`, title lengths, each token's characters in its title or text, the
    text each block covers, and how many texts did not fit their block and were cut."""
    def enc(strings: list[str]):
        # Only the first max_chars of a text can reach a block; one token past the room tells a text that was cut
        # from one that just fits.
        out = tokenizer([t[:max_chars(max_len)] for t in strings], add_special_tokens=False, truncation=True,
                        max_length=max_len - 2, return_attention_mask=False, return_token_type_ids=False,
                        return_offsets_mapping=True)
        return zip(out["input_ids"], out["offset_mapping"])

    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows, title_lens, chars, texts, cut = [], [], [], [], 0
    for d, (title, title_chars), (text, text_chars) in zip(docs, enc([d.title for d in docs]),
                                                           enc([d.text for d in docs])):
        # The title is kept whole unless it alone overflows: it is what tells blocks of one article apart.
        title, title_chars = title[:max_len - 3], title_chars[:max_len - 3]
        room = max_len - 3 - len(title)
        cut += len(text) > room
        text, text_chars = text[:room], text_chars[:room]
        rows.append([cls_id, *title, sep_id, *text, sep_id])
        title_lens.append(len(title))
        chars.append([(0, 0), *title_chars, (0, 0), *text_chars, (0, 0)])
        texts.append(d.text[:text_chars[-1][1]] if text_chars else "")
    return rows, title_lens, chars, texts, cut


def cut_long_docs(docs: list[Doc], max_len: int) -> tuple[list[Doc], list[tuple[str, int]]]:
    """Documents whose text is longer than a block of max_len tokens could ever hold (`max_chars`) cut there, at a
    space: a block keeps only a document's first tokens, and the rest would still be tokenized, split into
    sentences and trained on as queries whose source block does not hold them. Returns (docs, [(id, chars)] cut)."""
    limit, out, cut = max_chars(max_len), [], []
    for d in docs:
        if len(d.text) > limit:
            cut.append((d.id, len(d.text)))
            at = d.text.rfind(" ", 0, limit + 1)
            d = Doc(d.id, d.title, d.text[:at if at > 0 else limit])
        out.append(d)
    return out, cut


def contains_span(doc: np.ndarray, span: np.ndarray) -> bool:
    """Whether the token ids `span` occur in `doc`, in order and adjacent (a reader could copy them from there)."""
    n = len(span)
    return n > 0 and any(np.array_equal(doc[i:i + n], span) for i in np.flatnonzero(doc == span[0]))


class BlockStore:
    """Read-only view of a built store; cheap to open in every rank and every DataLoader worker."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"no block store at {path} (missing meta.json)")
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT or self.meta.get("version") not in (1, VERSION):
            raise ValueError(f"{path}: not a {FORMAT} v1/v{VERSION} store (meta.json says "
                             f"{self.meta.get('format')!r} v{self.meta.get('version')!r})")

        def load(name: str) -> np.ndarray:
            return np.load(path / f"{name}.npy", mmap_mode="r")

        self._tokens, self._offsets, self._title_len = load("tokens"), load("offsets"), load("title_len")
        self._titles, self._title_offsets = load("titles"), load("titles_offsets")
        self._ids, self._id_offsets = load("doc_ids"), load("doc_ids_offsets")
        if self.meta["version"] >= 2:
            self._texts, self._text_offsets = load("texts"), load("texts_offsets")
            self._token_chars = load("token_chars")
        self._index_of: dict[str, int] | None = None
        if len(self._offsets) != self.meta["count"] + 1 or len(self._tokens) != self._offsets[-1]:
            raise ValueError(f"{path}: arrays disagree with meta.json count={self.meta['count']}")

    @classmethod
    def open(cls, path: str | os.PathLike) -> BlockStore:
        return cls(path)

    @classmethod
    def build(cls, docs: Sequence[Doc], tokenizer, out_dir: str | os.PathLike, max_len: int = 288,
              batch_size: int = 1024) -> BlockStore:
        """Tokenize `docs` into blocks of at most `max_len` tokens and write the store atomically to `out_dir`."""
        if max_len < 3:
            raise ValueError(f"max_len={max_len} cannot hold [CLS] [SEP] [SEP]")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("tokenizer has no [CLS]/[SEP] token")
        seen: set[str] = set()
        cut = 0
        with atomic_dir(out_dir) as tmp:
            with (_NpyAppender(tmp / "tokens.npy", np.int32) as tokens,
                  _NpyAppender(tmp / "offsets.npy", np.int64) as offsets,
                  _NpyAppender(tmp / "title_len.npy", np.int32) as title_len,
                  _StringsAppender(tmp, "titles") as titles,
                  _StringsAppender(tmp, "doc_ids") as doc_ids,
                  _StringsAppender(tmp, "texts") as texts,
                  _NpyAppender(tmp / "token_chars.npy", np.int32, width=2) as token_chars):
                offsets.append([0])
                for start in range(0, len(docs), batch_size):
                    chunk = docs[start:start + batch_size]
                    for d in chunk:
                        if d.id in seen:
                            raise ValueError(f"duplicate doc id {d.id!r}: index_of() would be ambiguous")
                        seen.add(d.id)
                    rows, title_lens, chars, covered, chunk_cut = _encode_chunk(chunk, tokenizer, max_len)
                    cut += chunk_cut
                    lens = np.array([len(r) for r in rows], dtype=np.int64)
                    offsets.append(tokens.size + np.cumsum(lens))
                    tokens.append(np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(lens.sum())))
                    title_len.append(title_lens)
                    token_chars.append(np.asarray(list(itertools.chain.from_iterable(chars)), np.int32).reshape(-1, 2))
                    texts.append(covered)
                    titles.append([d.title for d in chunk])
                    doc_ids.append([d.id for d in chunk])
            meta = {"format": FORMAT, "version": VERSION, "count": len(docs), "num_tokens": tokens.size,
                    "max_len": max_len, "vocab_size": len(tokenizer),
                    "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
                    "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id,
                    "pad_id": tokenizer.pad_token_id,
                    "docs_cut": cut}  # documents whose text went past max_len: the rest is in no block
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return cls.open(out_dir)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _check(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for a store of {n}")
        return i + n if i < 0 else i

    def tokens(self, i: int) -> np.ndarray:
        """Block i's token ids, `[CLS] title [SEP] text [SEP]` (a read-only view of the memory map)."""
        i = self._check(i)
        return self._tokens[self._offsets[i]:self._offsets[i + 1]]

    def text_tokens(self, i: int) -> np.ndarray:
        """The text part of block i: after the title's [SEP], without the final [SEP]."""
        i = self._check(i)
        return self._tokens[self._offsets[i] + 2 + self._title_len[i]:self._offsets[i + 1] - 1]

    def title_len(self, i: int) -> int:
        """Title tokens in block i: they sit at positions 1..title_len, the text from title_len + 2."""
        return int(self._title_len[self._check(i)])

    def _v2(self, what: str) -> None:
        if self.meta["version"] < 2:
            raise ValueError(f"{self.path}: a v1 block store has no {what}; rebuild it (delete the directory and "
                             f"rerun the command that built it)")

    def text(self, i: int) -> str:
        """The text block i covers: the document's text up to its last kept token (a long passage is cut)."""
        self._v2("passage text")
        i = self._check(i)
        return self._texts[self._text_offsets[i]:self._text_offsets[i + 1]].tobytes().decode("utf-8")

    def token_chars(self, i: int) -> np.ndarray:
        """[n, 2] int32: each token's [start, end) characters in `title(i)` (positions 1..title_len) or `text(i)`
        (after the title's [SEP]); (0, 0) for [CLS]/[SEP]. The tokenizer's offsets: an uncased tokenizer's
        "cafe" still points at "Café"."""
        self._v2("token offsets")
        i = self._check(i)
        return self._token_chars[self._offsets[i]:self._offsets[i + 1]]

    def title(self, i: int) -> str:
        i = self._check(i)
        return self._titles[self._title_offsets[i]:self._title_offsets[i + 1]].tobytes().decode("utf-8")

    def doc_id(self, i: int) -> str:
        i = self._check(i)
        return self._ids[self._id_offsets[i]:self._id_offsets[i + 1]].tobytes().decode("utf-8")

    def index_of(self, doc_id: str) -> int:
        """Block index of a document id. The first call builds an id -> index dict (about 100 B per block)."""
        if self._index_of is None:
            blob, cuts = self._ids.tobytes(), self._id_offsets.tolist()
            self._index_of = {blob[a:b].decode("utf-8"): i for i, (a, b) in enumerate(zip(cuts, cuts[1:]))}
        try:
            return self._index_of[str(doc_id)]
        except KeyError:
            raise KeyError(f"doc id {doc_id!r} not in block store {self.path}") from None

    def batch(self, indices, pad_id: int = 0, token_type_ids: bool = False) -> dict[str, torch.Tensor]:
        """Blocks `indices` padded to the longest of them: input_ids and attention_mask, LongTensor[b, L]
        (plus token_type_ids when asked). One gather from the memory map, no per-block Python loop."""
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and not (-n <= idx.min() and idx.max() < n):
            raise IndexError(f"block indices outside [-{n}, {n}) for a store of {n}")
        idx = np.where(idx < 0, idx + n, idx)
        starts = self._offsets[idx]
        lens = self._offsets[idx + 1] - starts
        cols = np.arange(int(lens.max(initial=0)))
        mask = cols[None, :] < lens[:, None]
        # Padding positions read the block's last token (always in range) and are then overwritten.
        gathered = self._tokens[starts[:, None] + np.minimum(cols[None, :], lens[:, None] - 1)]
        out = {"input_ids": torch.from_numpy(np.where(mask, gathered, pad_id).astype(np.int64)),
               "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if token_type_ids:
            text_start = 2 + self._title_len[idx].astype(np.int64)
            in_text = mask & (cols[None, :] >= text_start[:, None])
            out["token_type_ids"] = torch.from_numpy(in_text.astype(np.int64))
        return out
