"""`realm-hpc export`: plain transformers loads the exported encoders and reader and computes what ours do."""

import json

import torch
from safetensors.torch import load_file
from transformers import BertForMaskedLM, BertModel, BertTokenizerFast

from realm_hpc.cli import main
from realm_hpc.runs import load_checkpoint_dir
from realm_hpc.export import COPY_HEAD_FILE


def test_export_round_trip_through_plain_transformers(tiny_run, tmp_path):
    out = tmp_path / "export"
    main(["export", "--run", str(tiny_run), "--out", str(out)])
    cfg, tokenizer, model = load_checkpoint_dir(str(tiny_run / "checkpoint"))
    meta = json.loads((out / "realm_export.json").read_text())
    assert meta["pooling"] == cfg.model.pooling and meta["proj_dim"] == cfg.model.proj_dim

    text = ["marta kessler was born in velden.", "the bank of rovigo"]
    for name, ours in (("query_encoder", model.retriever.query), ("doc_encoder", model.retriever.doc)):
        tok = BertTokenizerFast.from_pretrained(out / name)
        enc = tok(text, padding=True, return_tensors="pt")
        bert, info = BertModel.from_pretrained(out / name, add_pooling_layer=False, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        bert.eval()
        proj = load_file(str(out / name / meta["projection_file"]))
        with torch.no_grad():
            hidden = bert(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = hidden[:, 0] if meta["pooling"] == "cls" else (hidden * mask).sum(1) / mask.sum(1)
            if meta["normalize"]:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            theirs = pooled @ proj["weight"].T + proj["bias"]
            expected = ours(enc["input_ids"], enc["attention_mask"])
        assert theirs.shape == (2, cfg.model.proj_dim)
        torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)

    mlm, info = BertForMaskedLM.from_pretrained(out / "reader", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    mlm.eval()
    enc = BertTokenizerFast.from_pretrained(out / "reader")(text, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(mlm(**enc).logits, model.reader.mlm(**enc).logits)
    assert (out / "reader" / COPY_HEAD_FILE).is_file() == cfg.model.copy_head == bool(meta["copy_head_file"])


def test_export_of_a_missing_run_is_one_line_error(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err and not (tmp_path / "x").exists()
