"""REALM's retriever: query encoder f(x) and document encoder g(z), BERT [CLS] -> linear projection."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from realm_hpc.config import ConfigError, ModelConfig


def bert_config(cfg: ModelConfig, vocab_size: int, max_len: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                      num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                      max_position_embeddings=max(512, max_len), hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def pretrained_dir(path: str) -> str:
    """`model.pretrained` checked before anything is built from it: a local HF model directory with its config and
    weights (from_pretrained would raise an OSError deep inside transformers)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"model.pretrained={path}: no such directory")
    if not (p / "config.json").is_file() or not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"model.pretrained={path}: not a Hugging Face model directory (needs config.json and "
                          f"{' or '.join(WEIGHT_FILES[:2])})")
    return path


def build_bert(cfg: ModelConfig, vocab_size: int, max_len: int) -> BertModel:
    if cfg.pretrained:
        return BertModel.from_pretrained(pretrained_dir(cfg.pretrained), add_pooling_layer=False)
    return BertModel(bert_config(cfg, vocab_size, max_len), add_pooling_layer=False)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int):
        super().__init__()
        self.bert = build_bert(cfg, vocab_size, max_len)
        self.proj = nn.Linear(self.bert.config.hidden_size, cfg.proj_dim)
        self.pooling, self.normalize = cfg.pooling, cfg.normalize
        if cfg.normalize:  # a unit vector's projection is as small as a random bias, which would swamp the ranking
            nn.init.zeros_(self.proj.bias)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The vector the projection reads: [CLS] or the masked mean, L2-normalised when `model.normalize`."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        # A sentence embedder (MiniLM) was trained for cosine similarity: its unnormalised vectors lose much of
        # their ranking through a random projection, its normalised ones far less (README, wiki recipe).
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(input_ids, attention_mask))


class Retriever(nn.Module):
    """Separate query and document encoders, as in REALM, starting from the same weights: REALM starts both from
    one BERT, and a shared start gives lexical overlap a similar embedding from the first step."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.query = Encoder(cfg, vocab_size, max(cfg.query_len, cfg.block_len))
        self.doc = Encoder(cfg, vocab_size, max(cfg.query_len, cfg.block_len))
        self.doc.load_state_dict(self.query.state_dict())

    @torch.no_grad()
    def init_projection_pca(self, pooled: torch.Tensor, score_scale: float) -> torch.Tensor:
        """Both encoders' projection := the top `proj_dim` principal directions of the corpus's pooled vectors
        `pooled` [N, H] (what `Encoder.pool` gives for every block), times sqrt(score_scale), bias 0; returns the
        corpus's embeddings under it (the index), so the corpus is encoded once, not twice.

        A random projection of a pretrained sentence embedder keeps little of its ranking; the principal
        directions keep nearly all of it (README, wiki recipe). Relevance is then score_scale x the inner
        product in that subspace (a cosine for normalised vectors), so that p(z|x) over the top-k is not flat."""
        proj_dim = self.doc.proj.out_features
        if proj_dim > min(pooled.shape):
            raise ConfigError(f"model.proj_init=pca: model.proj_dim={proj_dim} is more than the {min(pooled.shape)} "
                             "principal directions of the corpus's pooled vectors")
        x = pooled.double()
        _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        w = vh[:proj_dim]
        # An SVD's directions have arbitrary signs: fix them (largest component positive) so runs repeat.
        w = w * torch.sign(w.gather(1, w.abs().argmax(1, keepdim=True)))
        w = (w * score_scale ** 0.5).to(self.doc.proj.weight.dtype)
        for enc in (self.query, self.doc):
            enc.proj.weight.copy_(w.to(enc.proj.weight.device))
            nn.init.zeros_(enc.proj.bias)
        return pooled @ w.to(pooled.device).T
