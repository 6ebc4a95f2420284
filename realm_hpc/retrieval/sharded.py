"""The index across several trainers: replicated (every trainer holds all N rows) or sharded (each holds 1/T).

Both are built by arithmetic: trainer r encodes rows `shard_range(N, T, r)`; the replicated index all-gathers the
shards, the sharded one keeps its own. A sharded search all-gathers the queries, every trainer takes the top-k of
its rows through `kernels.ip_topk` (global ids, the source exclusion mapped into the shard), and the T candidate
lists are merged with the exact search's order: score descending, ties to the lower id. Every search is a
collective: all trainers search the same number of times (training steps and evaluation both are lockstep).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import kernels
from realm_hpc.dist import TrainerGroup
from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex, encode_blocks
from realm_hpc.retrieval.refresh import shard_range


def _all_gather_rows(x: torch.Tensor, group: TrainerGroup) -> list[torch.Tensor]:
    """Every trainer's `x` (same trailing shape, any number of rows), in trainer order, on the group's
    collective device (the trainer's GPU under nccl, the CPU under gloo)."""
    device = torch.device(group.comm_device)
    x = x.to(device)
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(group.size)]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(group.size)]
    dist.all_gather(out, padded.contiguous())
    return [o[: int(s.item())] for o, s in zip(out, sizes)]


class ShardedIndex(LiveIndex):
    """This trainer's rows [rows.start, rows.stop) of an N-row index; `search` is collective over the trainers."""

    def __init__(self, snapshot: IndexSnapshot, rows: range, n_total: int, group: TrainerGroup,
                 device: torch.device | str | None = None):
        super().__init__(snapshot, device)
        self.rows, self.n_total, self.group = rows, n_total, group

    def swap_full(self, full: torch.Tensor, version: int, weights_step: int) -> None:
        self.swap(IndexSnapshot(full[self.rows.start:self.rows.stop].contiguous(), version, weights_step))

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
        emb = self.snapshot.embeddings
        if k + 1 > emb.shape[0]:
            raise ValueError(f"index.sharded: a shard of {emb.shape[0]} rows cannot return k={k} (+1 excluded); "
                             "use fewer trainers or index.sharded=false")
        q = queries.detach().to(emb.device, emb.dtype)
        ex = exclude.to(emb.device) if exclude is not None else torch.full((q.shape[0],), -1, dtype=torch.long,
                                                                           device=emb.device)
        all_q = _all_gather_rows(torch.cat([q, ex.to(q.dtype).unsqueeze(1)], dim=1), self.group)
        mine = sum(len(a) for a in all_q[: self.group.rank])
        qs = torch.cat(all_q)
        q_all, ex_all = qs[:, :-1], qs[:, -1].long()
        inside = (ex_all >= self.rows.start) & (ex_all < self.rows.stop)
        local_ex = torch.where(inside, ex_all - self.rows.start, torch.full_like(ex_all, -1))
        scores, ids = kernels.ip_topk(q_all, emb, k, local_ex)
        cand = torch.cat([scores, (ids + self.rows.start).to(scores.dtype)], dim=1)  # fp32 holds ids < 2**24 exactly
        if self.n_total >= 2 ** 24:
            raise ValueError("index.sharded supports up to 2**24 documents")
        parts = _all_gather_rows(cand, self.group)
        all_scores = torch.cat([p[:, :k] for p in parts], dim=1)
        all_ids = torch.cat([p[:, k:] for p in parts], dim=1).long()
        # The exact search's order: score descending, ties to the lower id (stable sort on score after id).
        by_id = torch.argsort(all_ids, dim=1, stable=True)
        all_scores, all_ids = all_scores.gather(1, by_id), all_ids.gather(1, by_id)
        by_score = torch.argsort(all_scores, dim=1, descending=True, stable=True)[:, :k]
        top_scores, top_ids = all_scores.gather(1, by_score), all_ids.gather(1, by_score)
        out = top_scores[mine:mine + q.shape[0]], top_ids[mine:mine + q.shape[0]]
        return out[0].to(queries.device), out[1].to(queries.device)

    def embeddings_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Collective: every trainer's ids are gathered, each fills the rows of its shard, a sum over the trainers
        completes them."""
        emb = self.snapshot.embeddings
        parts = _all_gather_rows(ids.reshape(-1), self.group)
        mine = sum(len(p) for p in parts[: self.group.rank])
        wanted = torch.cat(parts).to(emb.device)
        inside = (wanted >= self.rows.start) & (wanted < self.rows.stop)
        out = torch.zeros(len(wanted), emb.shape[1], dtype=emb.dtype, device=emb.device)
        out[inside] = emb[wanted[inside] - self.rows.start]
        out = out.to(self.group.comm_device)
        dist.all_reduce(out)
        return out[mine:mine + ids.numel()].reshape(*ids.shape, -1).to(ids.device)

    def full_embeddings(self) -> torch.Tensor:
        """All N rows (collective), e.g. for a checkpoint."""
        return torch.cat(_all_gather_rows(self.snapshot.embeddings, self.group))


def full_embeddings(index: LiveIndex) -> torch.Tensor:
    return index.full_embeddings() if isinstance(index, ShardedIndex) else index.snapshot.embeddings


def index_from_full(full: torch.Tensor, version: int, weights_step: int, group: TrainerGroup,
                    sharded: bool, device: torch.device | str | None = None) -> LiveIndex:
    """The index of all N rows `full` (e.g. a checkpoint's, loaded on the CPU), on `device` (None: full's)."""
    if not (sharded and group.distributed):
        return LiveIndex(IndexSnapshot(full, version, weights_step), device)
    rows = shard_range(full.shape[0], group.size, group.rank)
    index = ShardedIndex(IndexSnapshot(full[:0], version, weights_step), rows, full.shape[0], group, device)
    index.swap_full(full, version, weights_step)
    return index


def build_index(encoder: torch.nn.Module, blocks, batch_size: int, version: int, weights_step: int,
                group: TrainerGroup, sharded: bool, pooled: bool = False) -> LiveIndex:
    """Encode the corpus with the trainers splitting the rows; a lone trainer encodes them all.
    pooled: index the vectors before the projection (see `encode_blocks`)."""
    if not group.distributed:
        return LiveIndex(IndexSnapshot(encode_blocks(encoder, blocks, batch_size, pooled=pooled), version,
                                       weights_step))
    rows = shard_range(len(blocks), group.size, group.rank)
    mine = encode_blocks(encoder, blocks, batch_size, indices=rows, pooled=pooled)
    if sharded:
        return ShardedIndex(IndexSnapshot(mine, version, weights_step), rows, len(blocks), group)
    return LiveIndex(IndexSnapshot(torch.cat(_all_gather_rows(mine, group)), version, weights_step))
