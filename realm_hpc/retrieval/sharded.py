"""The index across several trainers: replicated (every trainer holds all N rows) or sharded (each holds 1/T).

Both are built by arithmetic: trainer r encodes rows `shard_range(N, T, r)`; the replicated index all-gathers the
shards, the sharded one keeps its own. A new version from the refreshers reaches trainer 0 whole; it broadcasts it
to a replicated index and sends a sharded one each trainer's rows only (`swap_from_trainer0`), so no other trainer
ever holds N rows. A sharded search all-gathers the queries, every trainer takes the top-k of its rows through
`kernels.ip_topk` (global int64 ids, the source exclusion mapped into the shard), and the T candidate lists are
merged with the exact search's order: score descending, ties to the lower id. Every search is a collective: all
trainers search the same number of times (training steps and evaluation both are lockstep).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import kernels
from realm_hpc.dist import TrainerGroup
from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex, encode_blocks, shard_range


def _all_gather_rows(group: TrainerGroup, *xs: torch.Tensor) -> list[list[torch.Tensor]]:
    """For each of `xs` (tensors with the same number of rows, any trailing shape and dtype): every trainer's, in
    trainer order, on the group's collective device (the trainer's GPU under nccl, the CPU under gloo). Trainers
    may hold different numbers of rows."""
    device = torch.device(group.comm_device)
    n = torch.tensor([xs[0].shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(group.size)]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    gathered = []
    for x in xs:
        padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=device)
        padded[: x.shape[0]] = x.to(device)
        out = [torch.empty_like(padded) for _ in range(group.size)]
        dist.all_gather(out, padded)
        gathered.append([o[: int(s.item())] for o, s in zip(out, sizes)])
    return gathered


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of candidate lists laid side by side ([B, C] each), in the exact search's order: score descending,
    ties to the lower id (a stable sort on score after one on id)."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)


class ShardedIndex(LiveIndex):
    """This trainer's rows [rows.start, rows.stop) of an N-row index; `search` is collective over the trainers."""

    def __init__(self, snapshot: IndexSnapshot, rows: range, n_total: int, group: TrainerGroup,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(snapshot, device, dtype)
        self.rows, self.n_total, self.group = rows, n_total, group

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
        emb = self.snapshot.embeddings
        if k + 1 > emb.shape[0]:
            raise ValueError(f"index.sharded: a shard of {emb.shape[0]} rows cannot return k={k} (+1 excluded); "
                             "use fewer trainers or index.sharded=false")
        q = queries.detach().float()
        ex = exclude if exclude is not None else torch.full((q.shape[0],), -1, dtype=torch.long)
        all_q, all_ex = _all_gather_rows(self.group, q, ex.long().unsqueeze(1))
        mine = sum(len(a) for a in all_q[: self.group.rank])
        q_all = torch.cat(all_q).to(emb.device, emb.dtype)
        ex_all = torch.cat(all_ex).squeeze(1).to(emb.device)
        inside = (ex_all >= self.rows.start) & (ex_all < self.rows.stop)
        local_ex = torch.where(inside, ex_all - self.rows.start, torch.full_like(ex_all, -1))
        scores, ids = kernels.ip_topk(q_all, emb, k, local_ex)
        # Every trainer searched every query: same shapes everywhere, one all-gather. The float32 scores travel as
        # their bits beside the int64 global ids (a float would hold ids exactly only below 2**24 = 16.7M rows).
        cand = torch.cat([scores.view(torch.int32).long(), ids + self.rows.start], dim=1)
        cand = cand.to(self.group.comm_device)
        parts = [torch.empty_like(cand) for _ in range(self.group.size)]
        dist.all_gather(parts, cand)
        all_scores = torch.cat([p[:, :k].int().view(torch.float32) for p in parts], dim=1)
        all_ids = torch.cat([p[:, k:] for p in parts], dim=1)
        top_scores, top_ids = merge_topk(all_scores, all_ids, k)
        rows = slice(mine, mine + q.shape[0])
        return top_scores[rows].to(queries.device), top_ids[rows].to(queries.device)

    def embeddings_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Collective: every trainer's ids are gathered, each fills the rows of its shard, a sum over the trainers
        completes them."""
        emb = self.snapshot.embeddings
        parts = _all_gather_rows(self.group, ids.reshape(-1))[0]
        mine = sum(len(p) for p in parts[: self.group.rank])
        wanted = torch.cat(parts).to(emb.device)
        inside = (wanted >= self.rows.start) & (wanted < self.rows.stop)
        out = torch.zeros(len(wanted), emb.shape[1], dtype=emb.dtype, device=emb.device)
        out[inside] = emb[wanted[inside] - self.rows.start]
        out = out.to(self.group.comm_device)
        dist.all_reduce(out)
        return out[mine:mine + ids.numel()].reshape(*ids.shape, -1).to(ids.device)

    def full_embeddings(self) -> torch.Tensor | None:
        """All N rows on trainer 0, on its CPU, e.g. for a checkpoint (collective; the other trainers get None). The
        shards arrive one at a time, so no device holds more than its own shard and the one in flight."""
        emb, device = self.snapshot.embeddings, torch.device(self.group.comm_device)
        if self.group.rank != 0:
            dist.send(emb.to(device).contiguous(), dst=0)
            return None
        full = torch.empty(self.n_total, emb.shape[1], dtype=emb.dtype)
        full[self.rows.start:self.rows.stop] = emb.cpu()
        for r in range(1, self.group.size):
            rows = shard_range(self.n_total, self.group.size, r)
            buf = torch.empty(len(rows), emb.shape[1], dtype=emb.dtype, device=device)
            dist.recv(buf, src=r)
            full[rows.start:rows.stop] = buf.cpu()
        return full


def full_embeddings(index: LiveIndex) -> torch.Tensor | None:
    """All N rows of the index: a replicated one's own; a sharded one's on trainer 0 (None on the others)."""
    return index.full_embeddings() if isinstance(index, ShardedIndex) else index.snapshot.embeddings


def index_from_full(full: torch.Tensor, version: int, weights_step: int, group: TrainerGroup,
                    sharded: bool, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> LiveIndex:
    """The index of all N rows `full` (e.g. a checkpoint's, loaded on the CPU, on every trainer), on `device`
    (None: full's), in `dtype` (None: full's)."""
    if not (sharded and group.distributed):
        return LiveIndex(IndexSnapshot(full, version, weights_step), device, dtype)
    rows = shard_range(full.shape[0], group.size, group.rank)
    return ShardedIndex(IndexSnapshot(_own_rows(full, rows, device or full.device, dtype or full.dtype), version,
                                      weights_step), rows, full.shape[0], group, device, dtype)


def _own_rows(full: torch.Tensor, rows: range, device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of `rows` of `full`: a view would keep all N rows alive where the shard stays on full's device."""
    return full[rows.start:rows.stop].to(device, dtype, copy=True)


def swap_from_trainer0(live: LiveIndex, full: torch.Tensor | None, version: int, weights_step: int, n_docs: int,
                       dim: int, group: TrainerGroup) -> None:
    """Collective: every trainer swaps in the version whose N x D rows `full` only trainer 0 holds (None on the
    others). A replicated index gets them all (one broadcast); a sharded one gets its own rows only, which trainer 0
    sends it (one shard at a time: trainer 0's device holds its own shard and the one in flight, never all N rows;
    the others never allocate more than their shard). Rows travel in the index's dtype (bf16: half the bytes)."""
    device = torch.device(group.comm_device)  # nccl: CUDA tensors only
    if not isinstance(live, ShardedIndex):
        buf = (full.to(device, live.dtype) if group.rank == 0
               else torch.empty(n_docs, dim, dtype=live.dtype, device=device))
        dist.broadcast(buf, src=0)
        live.swap(IndexSnapshot(buf, version, weights_step))
        return
    if group.rank == 0:
        for r in range(1, group.size):
            rows = shard_range(n_docs, group.size, r)
            dist.send(full[rows.start:rows.stop].to(device, live.dtype).contiguous(), dst=r)
        mine = _own_rows(full, live.rows, live.device, live.dtype)
    else:
        mine = torch.empty(len(live.rows), dim, dtype=live.dtype, device=device)
        dist.recv(mine, src=0)
    live.swap(IndexSnapshot(mine, version, weights_step))


def build_index(encoder: torch.nn.Module, blocks, batch_size: int, version: int, weights_step: int,
                group: TrainerGroup, sharded: bool, pooled: bool = False,
                dtype: torch.dtype | None = None) -> LiveIndex:
    """Encode the corpus with the trainers splitting the rows; a lone trainer encodes them all.
    pooled: index the vectors before the projection (see `encode_blocks`). dtype: the live index's (None: float32)."""
    if not group.distributed:
        return LiveIndex(IndexSnapshot(encode_blocks(encoder, blocks, batch_size, pooled=pooled), version,
                                       weights_step), dtype=dtype)
    rows = shard_range(len(blocks), group.size, group.rank)
    mine = encode_blocks(encoder, blocks, batch_size, indices=rows, pooled=pooled)
    if sharded:
        return ShardedIndex(IndexSnapshot(mine, version, weights_step), rows, len(blocks), group, dtype=dtype)
    mine = mine.to(dtype or mine.dtype)  # gathered in the live dtype: bf16 moves half the bytes
    return LiveIndex(IndexSnapshot(torch.cat(_all_gather_rows(group, mine)[0]), version, weights_step))
