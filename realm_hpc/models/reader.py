"""The knowledge-augmented encoder: BERT MLM over `[CLS] x [SEP] z [SEP]`, optionally with a copy head.

The copy head (a gate between the vocabulary softmax and attention from the masked position over z's tokens)
is what lets a small reader trained from scratch learn to use documents within minutes (../shared/FACTS.md).
Only the masked positions are projected onto the vocabulary: [n, L, V] logits are never built, and the plain-MLM
loss (no copy head) goes through kernels.target_logprob, chunked over V: not even [n, T, V] logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM

import kernels
from realm_hpc.config import ModelConfig
from realm_hpc.models.encoders import bert_config, pretrained_dir


def copy_mixture_logp(vocab_logp: torch.Tensor, attn: torch.Tensor, input_ids: torch.Tensor, doc_mask: torch.Tensor,
                      gate_logit: torch.Tensor) -> torch.Tensor:
    """log(g p_vocab + (1 - g) p_copy) at each masked position: [n, T, V], in log space throughout.

    vocab_logp [n, T, V]: the vocabulary log-softmax; attn [n, T, L]: attention logits from the masked positions over
    the reader's tokens input_ids [n, L], of which only doc_mask [n, L] (z's tokens) may be copied; gate_logit
    [n, T, 1]: g = sigmoid(gate_logit), the vocabulary's weight. A row without document tokens (the null document)
    is the vocabulary alone. p_copy(v) = sum of the attention on z's copies of token v, summed relative to the row's
    largest weight, so a token keeps its copy probability down to ~e^-87 of that weight (float32's normal range)
    and a vocabulary probability far below float32's range stays a finite log (log(clamp_min(p, 1e-30)) was -69).
    The scatter_add_ is nondeterministic on CUDA unless train.deterministic is set.
    """
    has_doc = doc_mask.any(dim=1)[:, None, None]
    attn = attn.float().masked_fill(~doc_mask.unsqueeze(1), float("-inf"))
    log_attn = F.log_softmax(torch.where(has_doc, attn, torch.zeros_like(attn)), dim=-1)
    top = log_attn.detach().amax(dim=-1, keepdim=True)  # a shift only: log p_copy does not depend on it
    rel = torch.zeros_like(vocab_logp).scatter_add_(
        2, input_ids.unsqueeze(1).expand(-1, attn.size(1), -1), (log_attn - top).exp())
    # log 0 = -inf without a NaN gradient: the where hands the clamped branch a zero gradient where rel = 0
    log_copy = torch.where(rel > 0, rel.clamp_min(torch.finfo(rel.dtype).tiny).log(),
                           torch.full_like(rel, float("-inf"))) + top
    gate_logit = gate_logit.float()
    log_gate = torch.where(has_doc, F.logsigmoid(gate_logit), torch.zeros_like(gate_logit))
    log_not_gate = torch.where(has_doc, F.logsigmoid(-gate_logit), torch.full_like(gate_logit, float("-inf")))
    return torch.logaddexp(log_gate + vocab_logp, log_not_gate + log_copy)


class Reader(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if cfg.pretrained:
            self.mlm = BertForMaskedLM.from_pretrained(pretrained_dir(cfg.pretrained))
        else:
            self.mlm = BertForMaskedLM(bert_config(cfg, vocab_size, cfg.reader_len))
        hidden = self.mlm.config.hidden_size
        self.copy_head = cfg.copy_head
        if cfg.copy_head:
            self.copy_query = nn.Linear(hidden, hidden)
            self.copy_key = nn.Linear(hidden, hidden)
            self.copy_gate = nn.Linear(hidden, 1)

    def _encode(self, input_ids, attention_mask, token_type_ids, positions):
        """(last hidden states [n, L, H], those at the masked positions [n, T, H])."""
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
        return hidden, torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                       positions: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
        """Log-distribution over the vocabulary at each masked position: [n, T, V].

        positions: [n, T] masked positions (padded entries point at 0 and are ignored by the caller);
        doc_mask: [n, L] True on the tokens of z the copy head may point at.
        """
        hidden, at = self._encode(input_ids, attention_mask, token_type_ids, positions)
        vocab_logp = F.log_softmax(self.mlm.cls(at).float(), dim=-1)
        if not self.copy_head:
            return vocab_logp
        attn = torch.einsum("nth,nlh->ntl", self.copy_query(at), self.copy_key(hidden)) / hidden.size(-1) ** 0.5
        return copy_mixture_logp(vocab_logp, attn, input_ids, doc_mask, self.copy_gate(at))

    def target_logprob(self, input_ids, attention_mask, token_type_ids, positions, targets, target_mask,
                       doc_mask) -> torch.Tensor:
        """log p(y | z, x) of the whole masked span (sum over its tokens): [n].

        Without the copy head the vocabulary projection runs chunked (kernels.target_logprob), so the [n, T, V]
        log-softmax of token_logprobs is never built for the loss.
        """
        if not self.copy_head:
            _, at = self._encode(input_ids, attention_mask, token_type_ids, positions)
            head = self.mlm.cls.predictions
            return kernels.target_logprob(head.transform(at), head.decoder.weight, head.decoder.bias,
                                          targets, target_mask)
        logp = self.token_logprobs(input_ids, attention_mask, token_type_ids, positions, doc_mask)
        picked = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)
        return (picked * target_mask).sum(dim=1)
