import gzip
import os
import pickle

import pytest

from realm_hpc.data.corpus import CorpusFormatError, Doc, atomic_dir, iter_corpus, read_corpus, write_jsonl


def _write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _assert_names_line(err: CorpusFormatError, path, lineno: int, fragment: str) -> None:
    msg = str(err)
    assert msg.startswith(f"{path}:{lineno}: "), msg
    assert "\n" not in msg
    assert fragment in msg, msg
    assert (err.path, err.lineno) == (str(path), lineno)


# ---------------------------------------------------------------------------------------------------------------
# Good files
# ---------------------------------------------------------------------------------------------------------------


def test_dpr_tsv_parses_with_csv_quoting(tmp_path):
    path = _write(tmp_path, "psgs.tsv",
                  "id\ttext\ttitle\r\n"  # DPR's file has CRLF endings
                  '1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\r\n'
                  '2\tplain text, no quotes\t"""Weird Al"" Yankovic"\r\n'
                  '3\tsays "hi" inside\ttitle with a "quote\r\n'  # not fully wrapped: quotes are literal
                  "\n")  # a trailing blank line is not a document
    assert read_corpus(path) == [
        Doc(id="1", title="Aaron", text='Aaron ( or ; "Ahärôn") is a prophet'),
        Doc(id="2", title='"Weird Al" Yankovic', text="plain text, no quotes"),
        Doc(id="3", title='title with a "quote', text='says "hi" inside'),
    ]


def test_jsonl_parses_int_and_str_ids(tmp_path):
    path = _write(tmp_path, "c.jsonl",
                  '{"id": 7, "title": "Seven", "text": "the number after six"}\n'
                  "\n"
                  '{"id": "x-1", "title": "", "text": "no title\\nand a newline", "extra": 1}\n')
    assert read_corpus(path) == [
        Doc(id="7", title="Seven", text="the number after six"),
        Doc(id="x-1", title="", text="no title\nand a newline"),
    ]


def test_gzipped_corpus_reads_like_plain(tmp_path):
    body = "id\ttext\ttitle\n1\tsome text\tT\n"
    plain = _write(tmp_path, "a.tsv", body)
    packed = _write(tmp_path, "a.tsv.gz", gzip.compress(body.encode()))
    assert read_corpus(packed) == read_corpus(plain) == [Doc(id="1", title="T", text="some text")]


# ---------------------------------------------------------------------------------------------------------------
# Malformed files: every error names file:line
# ---------------------------------------------------------------------------------------------------------------

_TSV_BAD = {
    "wrong header": ("id\ttitle\ttext\n1\tx\tT\n", 1, "expected header"),
    "empty file": ("", 1, "empty file"),
    "two fields": ("id\ttext\ttitle\n1\tok\tT\n2\tno title field\n", 3, "got 2"),
    "four fields": ("id\ttext\ttitle\n1\ta\tb\tc\n", 2, "got 4"),
    "empty text": ("id\ttext\ttitle\n1\tok\tT\n\n2\t\"\"\tT\n", 4, "empty text"),
    "blank text": ("id\ttext\ttitle\n1\t   \tT\n", 2, "empty text"),
    "empty id": ("id\ttext\ttitle\n\tsome text\tT\n", 2, "empty id"),
    "duplicate id": ("id\ttext\ttitle\n1\ta\tA\n2\tb\tB\n1\tc\tC\n", 4, "duplicate id '1' (first at line 2)"),
    "bad utf-8": (b"id\ttext\ttitle\n1\tok\tT\n2\t\xff\xfe\tT\n", 3, "invalid UTF-8"),
}

_JSONL_BAD = {
    "bad json": ('{"id": 1, "title": "", "text": "a"}\n{"id": 2, "title": \n', 2, "bad JSON"),
    "not an object": ('["id", "title", "text"]\n', 1, "expected a JSON object"),
    "missing text": ('{"id": 1, "title": "t"}\n', 1, "missing key(s) 'text'"),
    "bool id": ('{"id": true, "title": "t", "text": "a"}\n', 1, "'id' must be"),
    "float id": ('{"id": 1.5, "title": "t", "text": "a"}\n', 1, "'id' must be"),
    "text not str": ('{"id": 1, "title": "t", "text": ["a"]}\n', 1, "'text' must be a string"),
    "empty text": ('\n\n{"id": 1, "title": "t", "text": ""}\n', 3, "empty text"),  # blank lines still count
    # 1 and "1" are the same document id once read: the retriever only ever sees strings.
    "duplicate id": ('{"id": 1, "title": "", "text": "a"}\n{"id": "1", "title": "", "text": "b"}\n', 2,
                     "duplicate id '1'"),
}


@pytest.mark.parametrize("suffix,case", [(".tsv", c) for c in _TSV_BAD] + [(".jsonl", c) for c in _JSONL_BAD])
def test_malformed_line_names_file_and_line(tmp_path, suffix, case):
    content, lineno, fragment = (_TSV_BAD if suffix == ".tsv" else _JSONL_BAD)[case]
    path = _write(tmp_path, "corpus" + suffix, content)
    with pytest.raises(CorpusFormatError) as info:
        read_corpus(path)
    _assert_names_line(info.value, path, lineno, fragment)


def test_error_message_stays_one_line_and_survives_pickling(tmp_path):
    err = CorpusFormatError(tmp_path / "c.tsv", 12, "bad\nthing")
    assert str(err) == f"{tmp_path / 'c.tsv'}:12: bad\\nthing"
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, CorpusFormatError) and str(again) == str(err) and again.lineno == 12


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_corpus(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(info.value) and "\n" not in str(info.value)

    path = _write(tmp_path, "corpus.csv", "id,text,title\n")
    with pytest.raises(ValueError) as info:
        read_corpus(path)
    assert not isinstance(info.value, CorpusFormatError)
    assert str(path) in str(info.value)


def test_iter_corpus_checks_the_file_before_the_first_document(tmp_path):
    # A generator would defer the error to the first next(); a caller's try/except around the call must see it.
    with pytest.raises(FileNotFoundError):
        iter_corpus(tmp_path / "missing.tsv")


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------

_AWKWARD = [
    Doc(id="1", title="Ünïcödé", text='quotes " and \\ backslash'),
    Doc(id="b", title="", text="tab\there, newline\nhere, line separator\u2028here"),
    Doc(id="3", title="T", text="plain"),
]


def test_write_jsonl_round_trips_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out" / "corpus.jsonl"  # the parent is created
    assert write_jsonl(iter(_AWKWARD), path) == path
    assert read_corpus(path) == _AWKWARD
    assert os.listdir(path.parent) == ["corpus.jsonl"]

    write_jsonl(_AWKWARD[:1], path)  # overwrite in place
    assert read_corpus(path) == _AWKWARD[:1]
    assert os.listdir(path.parent) == ["corpus.jsonl"]


def test_write_jsonl_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    write_jsonl(_AWKWARD, path)

    def docs_then_crash():
        yield _AWKWARD[0]
        raise RuntimeError("upstream died")

    with pytest.raises(RuntimeError):
        write_jsonl(docs_then_crash(), path)
    assert read_corpus(path) == _AWKWARD
    assert os.listdir(tmp_path) == ["corpus.jsonl"]


def test_atomic_dir_swaps_in_whole_directories_only(tmp_path):
    out = tmp_path / "store"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(os.listdir(out)) == ["a"]

    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b").write_text("half")
            raise RuntimeError("crash mid-build")
    assert sorted(os.listdir(out)) == ["a"]  # the old store, untouched

    with atomic_dir(out) as tmp:
        (tmp / "c").write_text("2")
    assert sorted(os.listdir(out)) == ["c"]  # replaced, not merged
    assert os.listdir(tmp_path) == ["store"]  # no temp or old dirs left beside it


@pytest.mark.parametrize("name, content", [("c.jsonl", ""), ("c.jsonl", "\n\n"), ("c.tsv", "id\ttext\ttitle\n"),
                                           ("c.tsv", ""), ("c.json", "{}"), ("c.jsonl.gz", gzip.compress(b""))])
def test_a_corpus_without_documents_is_one_line(tmp_path, name, content):
    """An empty or header-only corpus used to reach the tokenizer, which raised IndexError."""
    path = _write(tmp_path, name, content)
    with pytest.raises(CorpusFormatError) as err:
        read_corpus(path)
    assert str(err.value).startswith(f"{path}:1: ") and "\n" not in str(err.value)
    assert "no documents" in str(err.value) or "expected header" in str(err.value)
