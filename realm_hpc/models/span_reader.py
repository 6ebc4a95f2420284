"""The Open-QA reader: BERT over `[CLS] q [SEP] z [SEP]` scoring candidate answer spans of z, and the loss that
marginalises over the retrieved documents and over every span that matches a gold answer (REALM §3.4 / ORQA).

Span score (REALM): S(i, j) = w · ReLU(A h_i + B h_j + b), from the start and end token representations; the
concatenation [h_i; h_j] through one linear layer is A h_i + B h_j, so each token is projected once, not once per
span. p(span | z, q) is a softmax over the candidate spans of one document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel

import kernels
from realm_hpc.config import ModelConfig
from realm_hpc.models.encoders import bert_config

NEG_INF = float("-inf")


class SpanReader(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, span_hidden: int = 0):
        super().__init__()
        if cfg.pretrained:  # the sizes are the HF checkpoint's; the finetuner then loads the pretrained reader's body
            self.bert = BertModel.from_pretrained(cfg.pretrained, add_pooling_layer=False)
        else:
            self.bert = BertModel(bert_config(cfg, vocab_size, cfg.reader_len), add_pooling_layer=False)
        hidden = self.bert.config.hidden_size
        span_hidden = span_hidden or hidden
        self.start = nn.Linear(hidden, span_hidden)
        self.end = nn.Linear(hidden, span_hidden, bias=False)
        self.score = nn.Linear(span_hidden, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                starts: torch.Tensor, ends: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Scores of candidate spans [N, S] (-inf where `valid` is False). starts/ends: [N, S] inclusive token
        positions in the input rows."""
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        a, b = self.start(h), self.end(h)  # [N, L, P]
        pick = lambda x, pos: torch.gather(x, 1, pos.unsqueeze(-1).expand(-1, -1, x.size(-1)))  # noqa: E731
        scores = self.score(F.relu(pick(a, starts) + pick(b, ends))).squeeze(-1).float()
        return scores.masked_fill(~valid, NEG_INF)


def _safe_logsumexp(x: torch.Tensor, keep: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """logsumexp of x over the entries where `keep`; -inf (with zero gradient, not NaN) where none is kept."""
    has = keep.any(dim=dim)
    safe = torch.where(keep, x, torch.full_like(x, NEG_INF))
    safe = torch.where(has.unsqueeze(dim), safe, torch.zeros_like(safe))
    return torch.where(has, torch.logsumexp(safe, dim=dim), torch.full_like(has, NEG_INF, dtype=x.dtype))


def span_log_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log p(span | z, q) over each document's valid spans: [..., S]; -inf on invalid spans and in documents
    without any candidate span."""
    lse = _safe_logsumexp(scores, valid)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.where(valid, scores - lse.unsqueeze(-1), torch.full_like(scores, NEG_INF))


def qa_marginal_loss(retrieval_scores: torch.Tensor, span_logp: torch.Tensor, match: torch.Tensor):
    """-log sum_z p(z|q) sum_{s in z matching a gold answer} p(s|z,q), averaged over the questions that have at
    least one matching span in their top-k documents (the others carry no signal and are skipped).

    retrieval_scores: [B, K]; span_logp: [B, K, S] (span_log_softmax); match: [B, K, S] bool.
    Returns (loss scalar, log_marginal [B] (-inf where skipped), used [B] bool).
    """
    doc_logp = _safe_logsumexp(span_logp, match & torch.isfinite(span_logp))  # [B, K], -inf: no match in z
    log_marginal = kernels.marginal_logsumexp(retrieval_scores, doc_logp)
    used = torch.isfinite(log_marginal)
    if used.any():
        loss = -log_marginal[used].mean()
    else:  # keeps the graph (zero gradients) so a step still runs
        loss = (retrieval_scores.sum() + span_logp.where(torch.isfinite(span_logp), 0).sum()) * 0.0
    return loss, log_marginal, used
