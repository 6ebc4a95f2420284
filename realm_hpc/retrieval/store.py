"""An index on disk: what `build-index` writes and `retrieve` / `evaluate --index` read.

INDEX_DIR/ of a dense index (backend exact | faiss-flat | faiss-ivfpq):
    embeddings.npy      [N, D] fp32 | fp16 | bf16 (bf16 stored as uint16 bit patterns: numpy has no bfloat16;
                        `embeddings()` views them back as torch.bfloat16 without a copy), memory-mapped on open
    doc_ids.npy, doc_ids_offsets.npy, titles.npy, titles_offsets.npy
                        UTF-8 strings back to back + int64 offsets (the block store's layout, copied from it)
    texts.npy, texts_offsets.npy
                        each document's text, same layout: what `evaluate --qa --index` checks answers in
                        (absent in an index built without the corpus texts)
    index.faiss         faiss-flat / faiss-ivfpq only: the faiss index (faiss.write_index), so an IVF-PQ index
                        is trained once
    query_encoder.pt, tokenizer/, config.json
                        what embedding a question needs, without the run
    meta.json           format, count, dim, dtype, backend and its parameters, encoder, and a sha256 per file

INDEX_DIR/ of a BM25 index (backend bm25, realm_hpc/retrieval/bm25.py; no encoder, no checkpoint):
    bm25/               bm25s's own save (sparse score matrix, vocabulary, parameters)
    doc_ids, titles, texts (+ _offsets)   as above
    meta.json           format, count, backend, backend_params, tokenization (lower-casing, stopwords), sha256s

The directory is written whole to a temp name and renamed (atomic_dir); on open every file's size and sha256 are
checked against meta.json, so a torn, truncated or altered index (faiss and bm25s files included) is refused.
`open_index` opens either kind; both answer `search(questions, k)` and `search_rows(questions, k)`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from realm_hpc.config import Config, from_dict, read_json
from realm_hpc.data.blocks import _StringsAppender
from realm_hpc.data.corpus import Doc, atomic_dir
from realm_hpc.data.tokenizer import load_tokenizer
from realm_hpc.retrieval import bm25
from realm_hpc.retrieval.backends import Backend, build_backend, read_faiss, write_faiss
from realm_hpc.retrieval.index import encode_blocks

FORMAT = "realm-hpc-index/2"
# numpy dtype each storage dtype is written as, and how meta.json describes it
STORAGE = {"fp32": (np.float32, "float32"), "fp16": (np.float16, "float16"),
           "bf16": (np.uint16, "uint16: bfloat16 bit patterns (view as torch.bfloat16)")}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STRING_FILES = ("doc_ids.npy", "doc_ids_offsets.npy", "titles.npy", "titles_offsets.npy")
TEXT_FILES = ("texts.npy", "texts_offsets.npy")
FAISS_FILE = "index.faiss"
BM25_DIR = "bm25"
ENCODE_CHUNK = 4096  # documents encoded per chunk, written straight into the memory-mapped .npy


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float embeddings -> the numpy array embeddings.npy holds for ``dtype``."""
    t = x.detach().cpu().to(TORCH_DTYPES[dtype])
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bf16" else t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """embeddings.npy's array (memory-mapped) -> a torch tensor of ``dtype`` sharing its memory."""
    with warnings.catch_warnings():  # read-only memory map: the index never writes to it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.asarray(a).view(np.int16) if dtype == "bf16" else np.asarray(a))
    return t.view(torch.bfloat16) if dtype == "bf16" else t


def build_index(model, blocks, tokenizer, cfg: Config, out: str | Path, texts: Sequence[str] | None = None,
                embeddings: torch.Tensor | None = None) -> Path:
    """Encode every block with the model's doc encoder into INDEX_DIR ``out`` (cfg.index: backend, dtype, IVF-PQ
    parameters), with a progress bar; the directory appears complete or not at all. ``texts``: the documents' texts
    in block order, kept for `evaluate --qa --index` (DPR's answer-in-passage check). ``embeddings``: the blocks'
    g(z) [N, D] already computed (a run's start index), stored instead of encoding again."""
    icfg = cfg.index
    n, dim = len(blocks), cfg.model.proj_dim
    if texts is not None and len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} blocks")
    if embeddings is not None and tuple(embeddings.shape) != (n, dim):
        raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} for {n} blocks of dim {dim}")
    np_dtype = STORAGE[icfg.dtype][0]
    with atomic_dir(out) as tmp:
        emb = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np_dtype, shape=(n, dim))
        with tqdm(total=n, desc="encode", unit="doc") as bar:
            for a in range(0, n, ENCODE_CHUNK):
                rows = range(a, min(n, a + ENCODE_CHUNK))
                done = (embeddings[rows.start:rows.stop] if embeddings is not None
                        else encode_blocks(model.retriever.doc, blocks, cfg.refresh.batch_size, indices=rows))
                emb[rows.start:rows.stop] = to_storage(done, icfg.dtype)
                bar.update(len(rows))
        emb.flush()
        del emb
        for name in STRING_FILES:
            shutil.copyfile(Path(blocks.path) / name, tmp / name)
        if texts is not None:
            _write_strings(tmp, "texts", texts)
        params = {}
        if icfg.backend != "exact":
            # faiss stores float32: it indexes the stored (rounded) values, so every backend searches the same rows
            x = from_storage(np.load(tmp / "embeddings.npy", mmap_mode="r"), icfg.dtype).float()
            backend = build_backend(icfg.backend, x, **_build_params(icfg, n))
            write_faiss(backend, tmp / FAISS_FILE)
            params = {k: v for k, v in backend.params.items() if k != "gpu"}
        torch.save(model.retriever.query.state_dict(), tmp / "query_encoder.pt")  # `embed` loads it on the CPU
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _write_meta(tmp, {"format": FORMAT, "count": n, "dim": dim, "dtype": icfg.dtype,
                          "storage": STORAGE[icfg.dtype][1], "backend": icfg.backend, "backend_params": params,
                          "encoder": cfg.model.pretrained or "scratch"})
    return Path(out)


def build_bm25_index(docs: Sequence[Doc], out: str | Path, params: dict | None = None) -> Path:
    """A BM25 index directory of ``docs`` (no encoder): bm25s's index of title + text, the ids, titles and texts;
    written to a temp directory and renamed like a dense one."""
    if not docs:
        raise ValueError("no documents to index")
    retriever = bm25.build([d.title for d in docs], [d.text for d in docs], params)
    with atomic_dir(out) as tmp:
        bm25.save(retriever, tmp / BM25_DIR)
        for name, strings in (("doc_ids", [d.id for d in docs]), ("titles", [d.title for d in docs]),
                              ("texts", [d.text for d in docs])):
            _write_strings(tmp, name, strings)
        _write_meta(tmp, {"format": FORMAT, "count": len(docs), "backend": "bm25",
                          "backend_params": {"method": retriever.method, "k1": retriever.k1, "b": retriever.b},
                          "tokenization": bm25.tokenization()})
    return Path(out)


def _write_strings(directory: Path, name: str, strings: Sequence[str]) -> None:
    with _StringsAppender(directory, name) as out:
        for a in range(0, len(strings), ENCODE_CHUNK):
            out.append(strings[a:a + ENCODE_CHUNK])


def _write_meta(directory: Path, meta: dict) -> None:
    """meta.json last, with the size and sha256 of every file already in ``directory``."""
    meta["files"] = {str(f.relative_to(directory)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                     for f in sorted(directory.rglob("*")) if f.is_file()}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


def _build_params(icfg, n: int) -> dict:
    if icfg.backend == "faiss-flat":
        return {"gpu": False}  # written to disk: a CPU index (read_faiss gives a CPU index back)
    return {"nlist": icfg.nlist or None, "m": icfg.m or None, "nprobe": icfg.nprobe or None,
            "k_factor": icfg.k_factor}


class _Strings:
    """Strings stored as UTF-8 bytes back to back + int64 offsets (memory-mapped)."""

    def __init__(self, path: Path, name: str):
        self.data = np.load(path / f"{name}.npy", mmap_mode="r")
        self.offsets = np.load(path / f"{name}_offsets.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


class _IndexDir:
    """What every index directory has: meta.json's checks, the ids, titles and (optionally) texts, and search
    results as (doc id, title, score). Subclasses answer `search_rows`."""
    REQUIRED: tuple[str, ...] = STRING_FILES

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.doc_ids, self.titles = _Strings(path, "doc_ids"), _Strings(path, "titles")
        self.texts = _Strings(path, "texts") if TEXT_FILES[0] in meta["files"] else None
        if len(self.doc_ids) != meta["count"] or len(self.titles) != meta["count"]:
            raise ValueError(f"{path}: {len(self.doc_ids)} doc ids and {len(self.titles)} titles, meta.json says "
                             f"{meta['count']}")
        if self.texts is not None and len(self.texts) != meta["count"]:
            raise ValueError(f"{path}: {len(self.texts)} texts, meta.json says {meta['count']}")

    @staticmethod
    def _checked_meta(path: str | Path) -> tuple[Path, dict]:
        """meta.json, after checking the format and every file's size and sha256 against it."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: not an index directory (no meta.json)")
        meta = read_json(meta_path, ValueError)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: unknown index format {meta.get('format')!r} (expected {FORMAT}; "
                             "rebuild it with realm-hpc build-index)")
        for name, want in meta["files"].items():
            f = path / name
            if not f.is_file():
                raise ValueError(f"{f}: missing (torn index)")
            if f.stat().st_size != want["bytes"]:
                raise ValueError(f"{f}: {f.stat().st_size} bytes, meta.json says {want['bytes']} (truncated or "
                                 "altered index)")
            if _sha256(f) != want["sha256"]:
                raise ValueError(f"{f}: checksum does not match meta.json (torn or altered index)")
        return path, meta

    @classmethod
    def _require(cls, path: Path, meta: dict) -> None:
        for name in cls.REQUIRED:
            if name not in meta["files"]:
                raise ValueError(f"{path / 'meta.json'}: lists no {name}")

    def __len__(self) -> int:
        return self.meta["count"]

    def require_texts(self) -> None:
        if self.texts is None:
            raise ValueError(f"{self.path}: the index keeps no document texts (built without them; rebuild it with "
                             "realm-hpc build-index)")

    def text(self, row: int) -> str:
        """Document ``row``'s text (without its title)."""
        self.require_texts()
        return self.texts[row]

    def search_rows(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [B, k], rows int64 [B, k]) per question, best first."""
        raise NotImplementedError

    def search(self, questions: list[str], k: int) -> list[list[tuple[str, str, float]]]:
        """Top-k (doc id, title, score) per question, best first."""
        if not 1 <= k <= len(self):
            raise ValueError(f"--k must be between 1 and {len(self)}")
        scores, rows = self.search_rows(questions, k)
        return [[(self.doc_ids[i], self.titles[i], float(s)) for s, i in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), rows.tolist())]

    def retrieve(self, question: str, k: int) -> list[tuple[str, str, float]]:
        return self.search([question], k)[0]


def open_index(path: str | Path) -> "SavedIndex | BM25Index":
    """Any index directory, checked against its meta.json: a dense one (SavedIndex) or a BM25 one (BM25Index)."""
    path, meta = _IndexDir._checked_meta(path)
    kind = BM25Index if meta.get("backend") == "bm25" else SavedIndex
    kind._require(path, meta)
    return kind._opened(path, meta)


class SavedIndex(_IndexDir):
    """A dense index: embeddings, the query encoder that embeds questions, and the backend that searches them."""
    REQUIRED = ("embeddings.npy", *STRING_FILES, "config.json", "query_encoder.pt")

    def __init__(self, path: Path, meta: dict, cfg: Config):
        super().__init__(path, meta)
        self.cfg = cfg
        self.array = np.load(path / "embeddings.npy", mmap_mode="r")
        self._backend: Backend | None = None
        self._encoder = None
        self._tokenizer = None

    @classmethod
    def open(cls, path: str | Path) -> "SavedIndex":
        """Check the directory against meta.json (format, every file's size and sha256, shapes) and open it."""
        path, meta = cls._checked_meta(path)
        if meta.get("backend") == "bm25":
            raise ValueError(f"{path}: a bm25 index has no embeddings (open it with store.open_index)")
        cls._require(path, meta)
        return cls._opened(path, meta)

    @classmethod
    def _require(cls, path: Path, meta: dict) -> None:
        super()._require(path, meta)
        if meta["backend"] != "exact" and FAISS_FILE not in meta["files"]:
            raise ValueError(f"{path / 'meta.json'}: lists no {FAISS_FILE}")

    @classmethod
    def _opened(cls, path: Path, meta: dict) -> "SavedIndex":
        index = cls(path, meta, from_dict(json.loads((path / "config.json").read_text())))
        want_shape, want_dtype = (meta["count"], meta["dim"]), STORAGE[meta["dtype"]][0]
        if index.array.shape != want_shape or index.array.dtype != want_dtype:
            raise ValueError(f"{path / 'embeddings.npy'}: {index.array.dtype} {index.array.shape}, meta.json says "
                             f"{np.dtype(want_dtype)} {want_shape}")
        return index

    def embeddings(self) -> torch.Tensor:
        """[N, D] in the stored dtype, sharing the memory map."""
        return from_storage(self.array, self.meta["dtype"])

    def backend(self) -> Backend:
        """The backend the index was built for: exact over the stored rows, or the saved faiss index."""
        if self._backend is None:
            if self.meta["backend"] == "exact":
                self._backend = build_backend("exact", self.embeddings())
            else:
                self._backend = read_faiss(self.meta["backend"], self.path / FAISS_FILE)
            if (self._backend.n, self._backend.d) != (self.meta["count"], self.meta["dim"]):
                raise ValueError(f"{self.path / FAISS_FILE}: {self._backend.n} x {self._backend.d} vectors, "
                                 f"meta.json says {self.meta['count']} x {self.meta['dim']}")
        return self._backend

    def embed(self, questions: list[str]) -> torch.Tensor:
        from realm_hpc.models.encoders import Encoder

        if self._encoder is None:
            self._tokenizer = load_tokenizer(self.path / "tokenizer")
            self._encoder = Encoder(self.cfg.model, len(self._tokenizer), self.cfg.model.query_len)
            self._encoder.load_state_dict(torch.load(self.path / "query_encoder.pt", weights_only=True,
                                                      map_location="cpu"))
            self._encoder.eval()
        enc = self._tokenizer(questions, truncation=True, max_length=self.cfg.model.query_len, padding=True,
                              return_tensors="pt")
        with torch.no_grad():
            return self._encoder(enc["input_ids"], enc["attention_mask"])

    def search_rows(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.backend().search(self.embed(questions), k)
        return scores.float().cpu().numpy(), ids.cpu().numpy()


class BM25Index(_IndexDir):
    """A BM25 index (bm25s): questions are tokenized as the documents were, with the stopwords meta.json lists."""
    REQUIRED = (*STRING_FILES, *TEXT_FILES)

    def __init__(self, path: Path, meta: dict):
        super().__init__(path, meta)
        self.retriever = bm25.load(path / BM25_DIR)
        self.stopwords = meta["tokenization"]["stopwords"]
        if self.retriever.scores["num_docs"] != meta["count"]:
            raise ValueError(f"{path / BM25_DIR}: {self.retriever.scores['num_docs']} documents, meta.json says "
                             f"{meta['count']}")

    @classmethod
    def _opened(cls, path: Path, meta: dict) -> "BM25Index":
        if not any(name.startswith(f"{BM25_DIR}/") for name in meta["files"]):
            raise ValueError(f"{path / 'meta.json'}: lists no {BM25_DIR}/ files")
        return cls(path, meta)

    def search_rows(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return bm25.search(self.retriever, self.stopwords, questions, k)
