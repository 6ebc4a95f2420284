"""A lowercase BERT WordPiece vocabulary trained on the corpus, saved as a plain HF tokenizer directory.

Training is reproducible: the same texts give the same vocab.txt byte for byte, in any process. `tokenizers`
(0.23) alone does not promise that: it numbers the `##x` continuation pieces in hash-map order, and those ids
break ties between equally frequent merges, so two runs can pick different merges (huggingface/tokenizers#1794).
We pin those ids by training twice: a cheap first pass finds the `##x` pieces, the second declares them, sorted,
right after the special tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import BertWordPieceTokenizer
from transformers import BertTokenizerFast

from realm_hpc.data.corpus import atomic_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, BERT's order for [PAD] and [UNK]


def _train(texts: Sequence[str], vocab_size: int, specials: Sequence[str], min_frequency: int,
           limit_alphabet: int) -> list[str]:
    wp = BertWordPieceTokenizer(lowercase=True)  # strip_accents follows lowercase, as in BertTokenizerFast
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                           limit_alphabet=limit_alphabet, special_tokens=list(specials), show_progress=False)
    vocab = wp.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in ordered] == list(range(len(ordered))), "tokenizers returned non-contiguous ids"
    return ordered


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                    min_frequency: int = 2, limit_alphabet: int = 1000) -> BertTokenizerFast:
    """Train a lowercase WordPiece vocab of at most `vocab_size` tokens (the alphabet may push it past that),
    write `vocab.txt` + `tokenizer.json` + `tokenizer_config.json` atomically to `out_dir`, and load it back.

    `texts` is read twice; a one-shot iterator is first materialised into a list.
    """
    if isinstance(texts, str):  # would train on its characters, one "text" each
        raise TypeError("texts must be an iterable of strings, not a string")
    if not isinstance(texts, Sequence):
        texts = list(texts)
    # vocab_size 0 stops before the first merge: the alphabet and its ##x pieces only.
    probe = _train(texts, 0, SPECIAL_TOKENS, min_frequency, limit_alphabet)
    pieces = sorted(t for t in probe if t.startswith("##") and len(t) == 3)
    vocab = _train(texts, vocab_size, SPECIAL_TOKENS + tuple(pieces), min_frequency, limit_alphabet)

    with atomic_dir(out_dir) as tmp:
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                                model_max_length=512)
        tok.save_pretrained(str(tmp))
        # transformers 5 saves only tokenizer.json; vocab.txt keeps the directory readable by other BERT tooling.
        (tmp / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike) -> BertTokenizerFast:
    """A BERT tokenizer from a local HF directory (ours, or a downloaded `bert-base-uncased`); never the hub."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any((path / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise FileNotFoundError(f"no vocab.txt or tokenizer.json in tokenizer directory {path}")
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
