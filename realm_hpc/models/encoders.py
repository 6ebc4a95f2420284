"""REALM's retriever: query encoder f(x) and document encoder g(z), BERT [CLS] -> linear projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from realm_hpc.config import ModelConfig


def bert_config(cfg: ModelConfig, vocab_size: int, max_len: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                      num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                      max_position_embeddings=max(512, max_len), hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout)


def build_bert(cfg: ModelConfig, vocab_size: int, max_len: int) -> BertModel:
    if cfg.pretrained:
        return BertModel.from_pretrained(cfg.pretrained, add_pooling_layer=False)
    return BertModel(bert_config(cfg, vocab_size, max_len), add_pooling_layer=False)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int):
        super().__init__()
        self.bert = build_bert(cfg, vocab_size, max_len)
        self.proj = nn.Linear(self.bert.config.hidden_size, cfg.proj_dim)
        self.pooling, self.normalize = cfg.pooling, cfg.normalize
        if cfg.normalize:  # a unit vector's projection is as small as a random bias, which would swamp the ranking
            nn.init.zeros_(self.proj.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        # A sentence embedder (MiniLM) was trained for cosine similarity: its unnormalised vectors lose much of
        # their ranking through a random projection, its normalised ones far less (README, wiki recipe).
        return self.proj(F.normalize(pooled, dim=-1) if self.normalize else pooled)


class Retriever(nn.Module):
    """Separate query and document encoders, as in REALM, starting from the same weights: REALM starts both from
    one BERT, and a shared start gives lexical overlap a similar embedding from the first step."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.query = Encoder(cfg, vocab_size, max(cfg.query_len, cfg.block_len))
        self.doc = Encoder(cfg, vocab_size, max(cfg.query_len, cfg.block_len))
        self.doc.load_state_dict(self.query.state_dict())
