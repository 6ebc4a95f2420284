"""`realm-hpc export`: a trained run as plain Hugging Face directories, loadable without realm_hpc.

    out/query_encoder/   BertModel (save_pretrained) + tokenizer + realm_projection.safetensors
    out/doc_encoder/     the same for the document encoder
    out/reader/          BertForMaskedLM (save_pretrained) + tokenizer [+ realm_copy_head.safetensors]
    out/realm_export.json  pooling, projection size, copy head, source run

Load an encoder with `BertModel.from_pretrained(dir, add_pooling_layer=False)` (REALM uses no BERT pooler;
without the flag transformers adds a random one and warns). An embedding is `proj(pool(last_hidden_state))`:
pool is [CLS] or the attention-masked mean (`pooling` in realm_export.json), L2-normalised when `normalize` is
true; `proj` is a Linear whose `weight`
[proj_dim, hidden] and `bias` [proj_dim] are in realm_projection.safetensors. The reader's copy head (small
from-scratch recipes only) is extra: plain `BertForMaskedLM` gives the vocabulary distribution without it.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from realm_hpc.checkpoint import atomic_write_json
from realm_hpc.config import Config
from realm_hpc.data.corpus import atomic_dir
from realm_hpc.models.realm import Realm

PROJECTION_FILE = "realm_projection.safetensors"
COPY_HEAD_FILE = "realm_copy_head.safetensors"


def _tensors(module: nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def export_model(cfg: Config, tokenizer, model: Realm, out: str | os.PathLike, source: str = "") -> Path:
    """Write the three models under `out` (atomically: the directory appears complete or not at all)."""
    with atomic_dir(out) as tmp:
        for name, encoder in (("query_encoder", model.retriever.query), ("doc_encoder", model.retriever.doc)):
            encoder.bert.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
            save_file(_tensors(encoder.proj), str(tmp / name / PROJECTION_FILE))
        reader = model.reader
        reader.mlm.save_pretrained(tmp / "reader")
        tokenizer.save_pretrained(tmp / "reader")
        if reader.copy_head:
            heads = {f"{n}.{k}": v for n in ("copy_query", "copy_key", "copy_gate")
                     for k, v in _tensors(getattr(reader, n)).items()}
            save_file(heads, str(tmp / "reader" / COPY_HEAD_FILE))
        atomic_write_json(tmp / "realm_export.json", {
            "source_run": source, "recipe": cfg.recipe, "pooling": cfg.model.pooling,
            "normalize": cfg.model.normalize, "proj_dim": cfg.model.proj_dim, "copy_head": cfg.model.copy_head,
            "projection_file": PROJECTION_FILE, "copy_head_file": COPY_HEAD_FILE if reader.copy_head else None,
        })
    return Path(out)
