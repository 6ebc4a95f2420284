"""An index on disk: what `build-index` writes and `retrieve` reads.

INDEX_DIR/ holds embeddings.npy (memory-mapped on load), docs.json (ids and titles), the query encoder and its
tokenizer (so a question can be embedded without the run), and meta.json with a checksum. The directory is
written whole to a temp name and renamed; a torn or altered index is refused on open.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

import kernels
from realm_hpc.config import Config, from_dict
from realm_hpc.data.corpus import atomic_dir
from realm_hpc.data.tokenizer import load_tokenizer
from realm_hpc.retrieval.index import encode_blocks

FORMAT = "realm-hpc-index/1"


def _checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_index(model, data, cfg: Config, out: str | Path) -> Path:
    emb = encode_blocks(model.retriever.doc, data.blocks, cfg.refresh.batch_size, progress=True).numpy()
    with atomic_dir(out) as tmp:
        np.save(tmp / "embeddings.npy", emb.astype(np.float32))
        docs = {"ids": [data.blocks.doc_id(i) for i in range(len(data.blocks))],
                "titles": [data.blocks.title(i) for i in range(len(data.blocks))]}
        (tmp / "docs.json").write_text(json.dumps(docs))
        torch.save(model.retriever.query.state_dict(), tmp / "query_encoder.pt")
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
        data.tokenizer.save_pretrained(tmp / "tokenizer")
        meta = {"format": FORMAT, "count": int(emb.shape[0]), "dim": int(emb.shape[1]), "dtype": "float32",
                "encoder": cfg.model.pretrained or "scratch", "checksum": _checksum(tmp / "embeddings.npy")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return Path(out)


class SavedIndex:
    def __init__(self, path: Path, meta: dict, embeddings: np.ndarray, docs: dict, cfg: Config):
        self.path, self.meta, self.embeddings, self.docs, self.cfg = path, meta, embeddings, docs, cfg
        self._encoder = None
        self._tokenizer = None

    @classmethod
    def open(cls, path: str | Path) -> "SavedIndex":
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: not an index directory (no meta.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: unknown index format {meta.get('format')!r}")
        emb_path = path / "embeddings.npy"
        if _checksum(emb_path) != meta["checksum"]:
            raise ValueError(f"{emb_path}: checksum does not match meta.json (torn or altered index)")
        emb = np.load(emb_path, mmap_mode="r")
        if emb.shape != (meta["count"], meta["dim"]):
            raise ValueError(f"{emb_path}: shape {emb.shape} != meta.json ({meta['count']}, {meta['dim']})")
        docs = json.loads((path / "docs.json").read_text())
        if len(docs["ids"]) != meta["count"]:
            raise ValueError(f"{path / 'docs.json'}: {len(docs['ids'])} documents, meta.json says {meta['count']}")
        cfg = from_dict(json.loads((path / "config.json").read_text()))
        return cls(path, meta, emb, docs, cfg)

    def embed(self, questions: list[str]) -> torch.Tensor:
        from realm_hpc.models.encoders import Encoder

        if self._encoder is None:
            self._tokenizer = load_tokenizer(self.path / "tokenizer")
            self._encoder = Encoder(self.cfg.model, len(self._tokenizer), self.cfg.model.query_len)
            self._encoder.load_state_dict(torch.load(self.path / "query_encoder.pt", weights_only=True))
            self._encoder.eval()
        enc = self._tokenizer(questions, truncation=True, max_length=self.cfg.model.query_len, padding=True,
                              return_tensors="pt")
        with torch.no_grad():
            return self._encoder(enc["input_ids"], enc["attention_mask"])

    def retrieve(self, question: str, k: int) -> list[tuple[str, str, float]]:
        if not 1 <= k <= self.meta["count"]:
            raise ValueError(f"--k must be between 1 and {self.meta['count']}")
        scores, ids = kernels.ip_topk(self.embed([question]), torch.from_numpy(np.asarray(self.embeddings)), k)
        return [(self.docs["ids"][i], self.docs["titles"][i], float(s))
                for s, i in zip(scores[0].tolist(), ids[0].tolist())]
