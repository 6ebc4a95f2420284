"""REALM's marginal likelihood: p(y|x) = sum_z p(y|z,x) p(z|x) over the top-k retrieved docs plus the null doc.

Retrieval runs against the stale index (no gradient); the retrieved docs are then re-encoded with the current
doc encoder so the relevance scores f(x)·g(z) carry gradients to both encoders (REALM §3.2). Both hot spots go
through `kernels/`: `ip_topk` for the search and `marginal_logsumexp` for the marginal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import kernels
from realm_hpc.config import Config
from realm_hpc.data.blocks import contains_span
from realm_hpc.data.examples import Batch, PretrainData
from realm_hpc.models.encoders import Retriever
from realm_hpc.models.reader import Reader
from realm_hpc.retrieval.index import LiveIndex


@dataclass
class RealmOutput:
    log_marginal: torch.Tensor  # [B] log p(y|x)
    scores: torch.Tensor  # [B, K] relevance of the docs the reader saw (null doc last)
    reader_logprob: torch.Tensor  # [B, K] log p(y|z,x)
    doc_ids: torch.Tensor  # [B, K] block ids, -1 = null doc
    reader_inputs: dict
    query_drift: torch.Tensor | None = None  # train.query_anchor: mean ||f(x) - g(x)||^2 over the unmasked queries
    anchor_weight: float = 0.0
    span_held: torch.Tensor | None = None  # train.retriever_span_gate: [B] the queries whose scores train the retriever

    def loss(self, per_doc: bool = False) -> torch.Tensor:
        """REALM's -log p(y|x), batch mean. per_doc (train.warmup_loss): -mean_z log p(y|z,x) instead, every doc
        on its own, so the reader also learns from the docs whose posterior is ~0 (those without the span). Plus the
        query anchor's penalty where there is one."""
        nll = -(self.reader_logprob.mean(dim=1) if per_doc else self.log_marginal).mean()
        return nll if self.query_drift is None else nll + self.anchor_weight * self.query_drift


class Realm(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.retriever = Retriever(cfg.model, vocab_size)
        self.reader = Reader(cfg.model, vocab_size)
        self.doc_frozen = False

    def freeze_doc_encoder(self) -> None:
        """The doc encoder keeps its weights from here on (train.freeze_doc_encoder): no gradient, and no dropout
        either (eval mode, as the index was encoded), so the index holds exactly its embeddings and the top-k's are
        read from there instead of re-encoded."""
        self.doc_frozen = True
        self.retriever.doc.requires_grad_(False)
        self.retriever.doc.eval()

    def train(self, mode: bool = True) -> "Realm":
        super().train(mode)
        if self.doc_frozen:
            self.retriever.doc.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: batches, reader rows and the null document are moved here."""
        return next(self.parameters()).device

    def null_doc_score(self, q: torch.Tensor, data: PretrainData) -> torch.Tensor:
        # The null document is an empty block: [CLS] [SEP]. Encoding it each step keeps its score learnable.
        ids = torch.tensor([[data.cls_id, data.sep_id]], device=q.device)
        return q @ self.retriever.doc(ids, torch.ones_like(ids)).squeeze(0)

    def forward(self, batch: Batch, data: PretrainData, index: LiveIndex | None, k: int,
                train_retriever: bool = True, exclude_source: bool | None = None,
                docs: torch.Tensor | None = None) -> RealmOutput:
        """exclude_source: None = the config's trivial-retrieval exclusion (always on outside the reader warm-up).
        docs: [B, k'] block ids the reader reads first (the warm-up on the source block); the other k - k' are
        searched with those blocks excluded. Their relevance scores come from the current encoders."""
        device = self.device
        batch = batch.to(device)
        B = batch.query_ids.size(0)
        use_retrieval = self.cfg.retrieval.enabled and index is not None and k > 0
        with torch.set_grad_enabled(train_retriever and torch.is_grad_enabled()):
            q = self.retriever.query(batch.query_ids, batch.query_mask)
            parts_scores, parts_ids = [], []
            if use_retrieval:
                if exclude_source is None:
                    exclude_source = self.cfg.retrieval.exclude_source
                exclude = batch.source if exclude_source else None
                if docs is None:
                    stale_scores, ids = index.search(q, k, exclude)
                else:
                    stale_scores, ids = None, docs.to(device)
                    if k > ids.size(1):  # given docs (one each: the source block) + the top searched ones
                        ids = torch.cat([ids, index.search(q, k - ids.size(1), ids[:, 0])[1]], dim=1)
                if self.doc_frozen:  # the index is exact: the gradient reaches f(x) through g(z) read from it
                    parts_scores.append(torch.einsum("bp,bkp->bk", q, index.embeddings_of(ids).to(q.dtype)))
                elif train_retriever or stale_scores is None:
                    blocks = data.blocks.batch(ids.flatten().tolist())
                    g = self.retriever.doc(blocks["input_ids"].to(device),
                                           blocks["attention_mask"].to(device)).view(B, ids.size(1), -1)
                    parts_scores.append(torch.einsum("bp,bkp->bk", q, g))
                else:
                    parts_scores.append(stale_scores.to(q.dtype))
                parts_ids.append(ids)
            if self.cfg.retrieval.null_doc or not use_retrieval:
                parts_scores.append(self.null_doc_score(q, data).unsqueeze(1))
                parts_ids.append(torch.full((B, 1), -1, dtype=torch.long, device=device))
            scores = torch.cat(parts_scores, dim=1)
            doc_ids = torch.cat(parts_ids, dim=1)
        held = None
        if use_retrieval and self.cfg.train.retriever_span_gate and scores.requires_grad:
            held = self.span_held(batch, data, doc_ids)
            scores = torch.where(held.to(device)[:, None], scores, scores.detach())
        inputs = {name: t.to(device) for name, t in data.reader_inputs(batch, doc_ids).items()}
        logp = self.reader.target_logprob(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                                          inputs["positions"], inputs["targets"], inputs["target_mask"],
                                          inputs["doc_mask"]).view(B, -1)
        log_marginal = kernels.marginal_logsumexp(scores.float(), logp)
        out = RealmOutput(log_marginal, scores, logp, doc_ids, inputs, span_held=held)
        if train_retriever and self.doc_frozen and self.cfg.train.query_anchor > 0 and torch.is_grad_enabled():
            out.query_drift, out.anchor_weight = self.query_drift(batch), self.cfg.train.query_anchor
        return out

    @staticmethod
    def span_held(batch: Batch, data: PretrainData, doc_ids: torch.Tensor) -> torch.Tensor:
        """[B] bool: one of the query's docs (the null doc aside) holds every masked span of it, each span's tokens in
        order (train.retriever_span_gate). The spans are the runs of consecutive masked positions."""
        out = []
        positions, targets, n_masked = batch.positions.cpu(), batch.targets.cpu(), batch.target_mask.sum(1).long()
        for b, row in enumerate(doc_ids.tolist()):
            n = int(n_masked[b])
            pos, tgt = positions[b, :n].numpy(), targets[b, :n].numpy()
            cuts = np.flatnonzero(np.diff(pos) != 1) + 1
            spans = [s for s in np.split(tgt, cuts) if len(s)]
            out.append(bool(spans) and any(
                all(contains_span(data.blocks.tokens(d)[1:], s) for s in spans) for d in row if d >= 0))
        return torch.tensor(out, dtype=torch.bool)

    def query_drift(self, batch: Batch) -> torch.Tensor:
        """mean_b ||f(x_b) - g(x_b)||^2 over the batch's queries with their masked tokens put back (train.query_anchor):
        the frozen doc encoder g is the query encoder's start (both start as one), so this keeps f where it started on
        plain sentences (and questions), while the cloze queries it is trained on may move."""
        plain = batch.query_ids.clone()
        b, t = batch.target_mask.nonzero(as_tuple=True)
        plain[b, batch.positions[b, t] + 1] = batch.targets[b, t]  # + 1: the query row starts with [CLS]
        with torch.no_grad():
            anchor = self.retriever.doc(plain, batch.query_mask)
        return (self.retriever.query(plain, batch.query_mask) - anchor).pow(2).sum(-1).mean()

    @torch.no_grad()
    def predict_tokens(self, out: RealmOutput) -> torch.Tensor:
        """argmax_v sum_z p(z|x) p(v|z,x) at each masked position: [B, T]."""
        inp = out.reader_inputs
        B, K = out.doc_ids.shape
        token_logp = self.reader.token_logprobs(inp["input_ids"], inp["attention_mask"], inp["token_type_ids"],
                                                inp["positions"], inp["doc_mask"])  # [B*K, T, V]
        token_logp = token_logp.view(B, K, *token_logp.shape[1:])
        prior = torch.log_softmax(out.scores.float(), dim=1)[:, :, None, None]
        return torch.logsumexp(prior + token_logp, dim=1).argmax(dim=-1)
