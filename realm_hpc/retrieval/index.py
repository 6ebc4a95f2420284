"""The dense index of g(z) over the whole corpus, versioned, searched through `kernels.ip_topk`.

The index is stale by design (REALM): it is rebuilt from a recent doc-encoder snapshot and swapped in whole
between steps. `weights_step` records which training step's weights built it, so staleness is observable.
Its rows are split across ranks by arithmetic (`shard_range`): refreshers encode, and sharded trainers hold, the
same kind of contiguous slices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

import kernels

# index.live_dtype: what the trainers keep and search. bf16 halves a GPU's index (13.35M x 128: 3.4 GB instead of
# 6.8 GB) and the kernel still accumulates in float32; the top-k's scores are recomputed by the current encoders
# wherever the retriever trains (models/realm.py), so only which documents come back sees the rounding.
LIVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard_range(n: int, shards: int, i: int) -> range:
    """Rows of shard i of n rows split into `shards` contiguous slices (sizes differ by at most one)."""
    return range(n * i // shards, n * (i + 1) // shards)


@dataclass
class IndexSnapshot:
    embeddings: torch.Tensor  # [N, P] float32 as encoded (a live index keeps them in its own dtype)
    version: int
    weights_step: int  # the training step whose doc-encoder weights produced these embeddings


class LiveIndex:
    """The index the trainer searches. `swap` replaces it whole; a search never sees a half-built index.

    The embeddings live on the trainer's device (a GPU index is searched by the Triton kernel) in the index's dtype
    (`index.live_dtype`); a snapshot that arrives elsewhere or in another dtype (a refresher's float32 CPU array) is
    moved and cast by `swap`. device / dtype None: the first snapshot's."""

    def __init__(self, snapshot: IndexSnapshot, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else snapshot.embeddings.device
        self.dtype = dtype if dtype is not None else snapshot.embeddings.dtype
        self.snapshot = self._placed(snapshot)

    def _placed(self, snapshot: IndexSnapshot) -> IndexSnapshot:
        emb = snapshot.embeddings
        if emb.device == self.device and emb.dtype == self.dtype:
            return snapshot
        return replace(snapshot, embeddings=emb.to(self.device, self.dtype))

    @property
    def version(self) -> int:
        return self.snapshot.version

    def staleness(self, step: int) -> int:
        return step - self.snapshot.weights_step

    def swap(self, snapshot: IndexSnapshot) -> None:
        self.snapshot = self._placed(snapshot)

    def embeddings_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of documents `ids` (any shape of int64 ids): [*ids.shape, P] on the ids' device."""
        emb = self.snapshot.embeddings
        return emb[ids.to(emb.device)].to(ids.device)

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
        """(scores, ids) on the queries' device; the search itself runs where the embeddings are."""
        emb = self.snapshot.embeddings
        ex = exclude.to(emb.device) if exclude is not None else None
        scores, ids = kernels.ip_topk(queries.detach().to(emb.device, emb.dtype), emb, k, ex)
        return scores.to(queries.device), ids.to(queries.device)


@torch.no_grad()
def encode_blocks(encoder: torch.nn.Module, blocks, batch_size: int, progress: bool = False,
                  indices: range | None = None, pooled: bool = False) -> torch.Tensor:
    """g(z) for every block (or a range of them), in batches, in eval mode. The one encoding loop shared by the
    inline refresh, the refresher ranks and build-index. pooled: the vectors before the projection
    (`Encoder.pool`), from which `model.proj_init=pca` computes the projection."""
    indices = indices if indices is not None else range(len(blocks))
    was_training = encoder.training
    encoder.eval()
    out = []
    device = next(encoder.parameters()).device
    fn = encoder.pool if pooled else encoder
    starts = range(indices.start, indices.stop, batch_size)
    for start in tqdm(starts, desc="encode", disable=not progress, leave=False):
        batch = blocks.batch(range(start, min(start + batch_size, indices.stop)))
        out.append(fn(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float())
    encoder.train(was_training)
    width = encoder.proj.in_features if pooled else encoder.proj.out_features
    return torch.cat(out) if out else torch.empty(0, width, device=device)
