import os
import unicodedata

import numpy as np
import pytest
import torch

from realm_hpc.data.blocks import BlockStore, cut_long_docs, max_chars
from realm_hpc.data.corpus import Doc
from realm_hpc.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_wordpiece

# Many words with equal counts: the merges tie, which is where tokenizers' own training is not reproducible.
_TEXTS = [f"the quick brown fox number {i} jumps over the lazy dog near river {i % 7}." for i in range(200)] + [
    "Hello World, hello REALM retrieval! Ünïcödé café Ärger",
    "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau",
]

DOCS = [
    Doc(id="d0", title="Fox", text="the quick brown fox jumps over the lazy dog."),
    Doc(id="d1", title="", text="hello world"),
    Doc(id="d2", title="Café Ärger", text="alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"),
    Doc(id="42", title="River", text="near river 3 the lazy dog jumps."),
    Doc(id="d4", title="Greek", text="mu nu xi omicron pi rho sigma tau"),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "wordpiece"
    train_wordpiece(_TEXTS, vocab_size=120, out_dir=out, min_frequency=1)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def _ids(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_train_wordpiece_is_deterministic(tmp_path):
    outs = [tmp_path / f"run{i}" for i in range(3)]
    for out in outs:
        train_wordpiece(iter(_TEXTS), vocab_size=120, out_dir=out, min_frequency=1)  # a one-shot iterator too
    for name in ("vocab.txt", "tokenizer.json"):
        first = (outs[0] / name).read_bytes()
        assert all((out / name).read_bytes() == first for out in outs[1:]), name


def test_trained_tokenizer_round_trips(tok_dir, tok):
    assert sorted(os.listdir(tok_dir)) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert os.listdir(tok_dir.parent) == ["wordpiece"]  # no temp dir left beside it
    vocab = (tok_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == list(SPECIAL_TOKENS)
    assert len(vocab) == len(tok) <= 120
    assert [tok.convert_tokens_to_ids(t) for t in vocab] == list(range(len(vocab)))
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4)

    # Lowercase with accents stripped, and real merges were learnt (a frequent word is one piece).
    assert tok.tokenize("The QUICK Café") == tok.tokenize("the quick cafe")
    assert tok.tokenize("quick") == ["quick"]
    assert tok.tokenize("zebra") != ["[UNK]"]  # unseen word splits into known pieces

    again = load_tokenizer(tok_dir)
    text = "Hello lazy dog, jumps over river 5!"
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_load_tokenizer_reads_a_vocab_txt_only_dir(tmp_path, tok_dir, tok):
    # What a bare BERT checkpoint directory may hold: vocab.txt and no tokenizer.json.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "vocab.txt").write_bytes((tok_dir / "vocab.txt").read_bytes())
    text = "the quick brown fox near river 3"
    assert load_tokenizer(bare)(text)["input_ids"] == tok(text)["input_ids"]


def test_load_tokenizer_errors_are_one_line(tmp_path):
    for path in (tmp_path / "missing", tmp_path):  # absent dir; dir without a vocabulary
        with pytest.raises(FileNotFoundError) as info:
            load_tokenizer(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_train_wordpiece_rejects_a_bare_string(tmp_path):
    with pytest.raises(TypeError):
        train_wordpiece("one long text", vocab_size=50, out_dir=tmp_path / "t")


# ---------------------------------------------------------------------------------------------------------------
# Block store
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tok, tmp_path_factory):
    # batch_size 2 makes the build cross chunk boundaries (5 docs -> chunks of 2, 2, 1).
    return BlockStore.build(DOCS, tok, tmp_path_factory.mktemp("blocks") / "store", max_len=288, batch_size=2)


def test_build_open_round_trip(store, tok):
    reopened = BlockStore.open(store.path)
    assert len(reopened) == len(DOCS)
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    for i, d in enumerate(DOCS):
        expected = [cls_id, *_ids(tok, d.title), sep_id, *_ids(tok, d.text), sep_id]
        assert reopened.tokens(i).tolist() == expected
        assert reopened.text_tokens(i).tolist() == _ids(tok, d.text)
        assert (reopened.title(i), reopened.doc_id(i)) == (d.title, d.id)
        assert reopened.index_of(d.id) == i
    assert reopened.tokens(-1).tolist() == reopened.tokens(len(DOCS) - 1).tolist()
    assert reopened.tokens(0).dtype == np.int32

    meta = reopened.meta
    assert (meta["count"], meta["max_len"], meta["vocab_size"]) == (len(DOCS), 288, len(tok))
    assert meta["num_tokens"] == sum(len(reopened.tokens(i)) for i in range(len(DOCS)))
    assert meta["tokenizer"] == tok.name_or_path


def test_files_are_plain_npy_arrays(store):
    # The streamed writer must produce what np.save would: readable without mmap, offsets cutting tokens exactly.
    tokens = np.load(store.path / "tokens.npy")
    offsets = np.load(store.path / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
    assert np.all(np.diff(offsets) >= 3)
    assert np.array_equal(tokens, np.concatenate([store.tokens(i) for i in range(len(store))]))


def test_chunking_does_not_change_the_store(store, tok, tmp_path):
    whole = BlockStore.build(DOCS, tok, tmp_path / "whole", batch_size=1024)
    for name in ("tokens", "offsets", "title_len", "titles", "titles_offsets", "doc_ids", "doc_ids_offsets", "texts",
                 "texts_offsets", "token_chars"):
        assert np.array_equal(np.load(whole.path / f"{name}.npy"), np.load(store.path / f"{name}.npy")), name


def test_token_chars_point_at_the_passage_characters(store, tok):
    """Every token's characters, read from the block's own title or text, tokenize back to that token: uncased
    pieces of "Café Ärger" point at the accented capitals, "##" pieces inside their word."""
    for i, d in enumerate(DOCS):
        ids, chars, n_title = store.tokens(i), store.token_chars(i), store.title_len(i)
        assert chars.shape == (len(ids), 2) and chars.dtype == np.int32
        assert store.text(i) == d.text  # nothing cut at max_len=288
        assert chars[[0, n_title + 1, len(ids) - 1]].tolist() == [[0, 0]] * 3  # [CLS], [SEP], [SEP]
        for p in range(1, len(ids) - 1):
            if p == n_title + 1:
                continue
            source = d.title if p <= n_title else d.text
            piece = tok.convert_ids_to_tokens(int(ids[p]))
            a, b = chars[p]
            plain = "".join(c for c in unicodedata.normalize("NFD", source[a:b]) if not unicodedata.combining(c))
            assert plain.lower() == piece.removeprefix("##") or piece == "[UNK]", (piece, source[a:b])
    title_chars = store.token_chars(2)[1:1 + store.title_len(2)]
    assert store.title(2)[title_chars[0][0]:title_chars[-1][1]] == "Café Ärger"


def test_a_v1_store_opens_and_says_to_rebuild_for_text(store, tmp_path):
    import json
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(store.path, old)
    for name in ("texts", "texts_offsets", "token_chars"):
        (old / f"{name}.npy").unlink()
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    v1 = BlockStore.open(old)
    assert v1.tokens(0).tolist() == store.tokens(0).tolist()
    for read in (v1.text, v1.token_chars):
        with pytest.raises(ValueError, match=r"a v1 block store has no .*; rebuild it") as info:
            read(0)
        assert str(old) in str(info.value) and "\n" not in str(info.value)


def test_truncation_keeps_cls_title_and_final_sep(tok, tmp_path):
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    long_title = " ".join(["alpha beta gamma"] * 10)
    docs = [Doc(id="long", title="River", text=long_text), Doc(id="title", title=long_title, text="hello world")]
    s = BlockStore.build(docs, tok, tmp_path / "short", max_len=16)

    block = s.tokens(0).tolist()
    title = _ids(tok, "River")
    assert len(block) == 16
    assert block[0] == tok.cls_token_id and block[-1] == tok.sep_token_id
    assert block[1:1 + len(title)] == title and block[1 + len(title)] == tok.sep_token_id
    assert s.text_tokens(0).tolist() == _ids(tok, long_text)[:16 - 3 - len(title)]
    # The block's text is what its tokens cover, not the whole passage.
    kept = s.token_chars(0)[2 + len(title):-1]
    assert s.text(0) == long_text[:kept[-1][1]] and len(s.text(0)) < len(long_text)

    # A title that alone overflows is cut to fit; the text gets no room but the block stays well formed.
    block = s.tokens(1).tolist()
    assert block == [tok.cls_token_id, *_ids(tok, long_title)[:13], tok.sep_token_id, tok.sep_token_id]
    assert s.text_tokens(1).tolist() == [] and s.text(1) == ""


def test_batch_pads_to_longest_with_masks(store):
    picks = [2, 0, -1, 1]
    lens = [len(store.tokens(i)) for i in picks]
    b = store.batch(picks, pad_id=-7, token_type_ids=True)
    ids, mask, types = b["input_ids"], b["attention_mask"], b["token_type_ids"]
    assert ids.dtype == mask.dtype == types.dtype == torch.long
    assert ids.shape == mask.shape == types.shape == (4, max(lens))
    for row, (i, n) in enumerate(zip(picks, lens)):
        assert ids[row, :n].tolist() == store.tokens(i).tolist()
        assert (ids[row, n:] == -7).all()
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        # Segment 1 is exactly `text [SEP]`: the block's tail after the title's [SEP].
        n_text = len(store.text_tokens(i)) + 1
        assert types[row].tolist() == [0] * (n - n_text) + [1] * n_text + [0] * (ids.shape[1] - n)

    plain = store.batch(torch.tensor([1, 1]))
    assert set(plain) == {"input_ids", "attention_mask"}
    assert plain["attention_mask"].all() and plain["input_ids"].shape == (2, lens[-1])


def test_batch_edge_cases(store):
    empty = store.batch([])
    assert empty["input_ids"].shape == (0, 0)
    with pytest.raises(IndexError):
        store.batch([0, len(store)])
    with pytest.raises(IndexError):
        store.tokens(len(store))
    with pytest.raises(KeyError):
        store.index_of("no-such-doc")


def test_rebuild_replaces_and_failed_build_keeps_old_store(tok, tmp_path):
    out = tmp_path / "store"
    BlockStore.build(DOCS[:2], tok, out)
    BlockStore.build(DOCS, tok, out)
    assert len(BlockStore.open(out)) == len(DOCS)

    with pytest.raises(ValueError, match="duplicate doc id 'd0'"):
        BlockStore.build(DOCS + [DOCS[0]], tok, out)
    assert len(BlockStore.open(out)) == len(DOCS)
    assert os.listdir(tmp_path) == ["store"]


def test_open_missing_store_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        BlockStore.open(tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Documents longer than a block
# ---------------------------------------------------------------------------------------------------------------

CURIE = ("Marie Skłodowska-Curie (7 November 1867 – 4 July 1934) was a Polish and naturalised-French physicist and "
         "chemist who conducted pioneering research on radioactivity. She was the first woman to win a Nobel Prize, "
         "the first person to win a Nobel Prize twice, and the only person to win one in two sciences. ")


def test_a_long_document_is_cut_at_a_space_to_what_a_block_can_hold(tok, tmp_path):
    big = Doc(id="curie", title="Marie Curie", text=CURIE * 1000)  # ~300 KB
    docs, cut = cut_long_docs([DOCS[0], big], max_len=32)
    assert cut == [("curie", len(big.text))]
    assert docs[0] == DOCS[0]  # a short document is untouched
    kept = docs[1].text
    assert len(kept) <= max_chars(32) and big.text.startswith(kept) and big.text[len(kept)] == " "
    # The block is what the whole text gives: the cut keeps far more characters than 32 tokens need.
    s = BlockStore.build([big, Doc("cut", big.title, kept)], tok, tmp_path / "s", max_len=32)
    title = _ids(tok, big.title)
    assert s.tokens(0).tolist() == [tok.cls_token_id, *title, tok.sep_token_id,
                                    *_ids(tok, big.text)[:32 - 3 - len(title)], tok.sep_token_id]
    assert s.tokens(1).tolist() == s.tokens(0).tolist()
    assert s.meta["docs_cut"] == 2  # both texts went past their block


def test_the_store_counts_the_documents_it_cut(store, tok, tmp_path):
    assert store.meta["docs_cut"] == 0  # every DOCS text fits 288 tokens
    exact = Doc("exact", "", " ".join(["fox"] * 13))  # 13 tokens + [CLS] [SEP] [SEP] = 16: fits, not cut
    s = BlockStore.build([exact, Doc("over", "", " ".join(["fox"] * 14))], tok, tmp_path / "s", max_len=16)
    assert s.meta["docs_cut"] == 1 and len(s.tokens(0)) == len(s.tokens(1)) == 16


def test_pretraining_data_warns_once_and_trains_only_on_the_kept_text(tmp_path, capsys):
    """A multi-megabyte document took ~50 s to tokenize (4.7 MB, 36k sentences) and its sentences became queries
    whose source block did not hold them; it is cut to max_chars(model.block_len) with one warning line."""
    import json

    from realm_hpc.config import apply_overrides
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.recipes import get_recipe

    corpus = tmp_path / "c.jsonl"
    rows = [{"id": str(i), "title": f"Page {i}", "text": line} for i, line in enumerate(_TEXTS[:40])]
    rows.append({"id": "curie", "title": "Marie Curie", "text": CURIE * 7000})  # ~2 MB
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = apply_overrides(get_recipe("tiny"), [f"data.corpus={corpus}", "model.block_len=64", "model.vocab_size=300",
                                               "data.dev_examples=0"])
    data = PretrainData(cfg, tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: data.corpus: 1 document(s) cut to their first 2,048 "
                                              "characters (the longest: id 'curie', 2,"), err
    curie = data.blocks.index_of("curie")
    assert len(data.docs[curie].text) <= max_chars(64)
    spans = data.train.span[data.train.doc == curie]
    assert len(spans) and spans.max() <= max_chars(64)  # no query from past the cut
