"""A tiny end-to-end pretraining through the CLI, in-process, shared by every test of this module.

Timing (2 cores, OMP_NUM_THREADS=1 from conftest): the whole module ~20 s. The fixture prints its wall time.
"""

import json
import shutil
import time

import numpy as np
import pytest
import torch

from realm_hpc.cli import main
from realm_hpc.metrics import read_metrics

STEPS, REFRESH_EVERY, LOG_EVERY = 12, 5, 2
ARGS = ["--steps", str(STEPS), "--set", f"refresh.every={REFRESH_EVERY}", "--set", "train.reader_warmup_steps=4",
        "--set", f"train.log_every={LOG_EVERY}", "--set", "train.eval_every=1000",
        "--set", "train.checkpoint_every=1000", "--set", "eval.closed_book_baseline=true"]

SUMMARY_KEYS = {"recipe", "steps", "corpus_docs", "k", "ict_steps", "index_versions", "max_staleness_steps",
                "mean_staleness_steps", "trainer_wait_s", "realm_steps_per_s", "realm_loop_s", "refresh_mode", "wall_s",
                "trainer_wait_share",
                # dev: what the run looked at along the way (ICT's early stopping, mid-run evaluations)
                "dev_recall_at_8_start", "dev_recall_at_8_after_ict", "dev_recall_at_8", "dev_mlm_acc_retrieval",
                "dev_examples", "dev_examples_with_gold",
                # test: read at the start and the end only
                "test_recall_at_8_start", "test_recall_at_8", "test_chance_recall_at_8", "test_span_in_top_8_start",
                "test_recall_at_1_start", "test_recall_at_20_start", "test_recall_at_1", "test_recall_at_20",
                "test_span_in_top_8", "test_mlm_acc_retrieval", "test_mlm_acc_closed_book", "test_examples",
                "test_examples_with_gold", "test_mlm_eval_tokens", "test_mlm_eval_spans",
                "test_mlm_span_acc_retrieval", "test_mlm_span_acc_closed_book", "test_mlm_spans_only_retrieval_right",
                "test_mlm_spans_only_closed_book_right", "test_mlm_vs_closed_book_p_paired_spans",
                "test_mlm_acc_retrieval_span_in_top_8", "test_mlm_acc_retrieval_span_not_in_top_8",
                "test_mlm_acc_closed_book_span_in_top_8", "test_mlm_acc_closed_book_span_not_in_top_8",
                "test_mlm_tokens_span_in_top_8"}
ROW_KEYS = {"step", "phase", "loss", "lr", "index_version", "staleness", "wait_s"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    t0 = time.perf_counter()
    main(["pretrain", "--recipe", "tiny", "--out", str(out), *ARGS])
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    print(f"\ntiny pretrain ({STEPS} REALM steps): {wall:.1f} s wall; test recall@8 {summary['test_recall_at_8']:.3f} "
          f"(start {summary['test_recall_at_8_start']:.3f}, chance {summary['test_chance_recall_at_8']:.4f}; dev after "
          f"ICT {summary['dev_recall_at_8_after_ict']:.3f}), test mlm_acc {summary['test_mlm_acc_retrieval']:.3f}")
    return out


@pytest.fixture(scope="module")
def summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def index_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    main(["build-index", "--run", str(run), "--out", str(out)])
    return out


def test_summary_has_the_documented_keys(summary):
    assert set(summary) == SUMMARY_KEYS
    assert summary["recipe"] == "tiny" and summary["steps"] == STEPS and summary["k"] == 8
    assert summary["refresh_mode"] == "inline"
    for split in ("dev", "test"):
        assert summary[f"{split}_examples"] > 0 and summary["corpus_docs"] > summary[f"{split}_examples"]
        assert 0 < summary[f"{split}_examples_with_gold"] <= summary[f"{split}_examples"]
        assert 0.0 <= summary[f"{split}_mlm_acc_retrieval"] <= 1.0
    assert 0.0 <= summary["test_mlm_acc_closed_book"] <= 1.0
    # Paired counts on the same held-out spans: the span accuracies differ by exactly the discordant spans.
    n, n_spans = summary["test_mlm_eval_tokens"], summary["test_mlm_eval_spans"]
    assert 0 < n_spans == summary["test_examples"] <= n
    gap = (summary["test_mlm_spans_only_retrieval_right"] - summary["test_mlm_spans_only_closed_book_right"]) / n_spans
    assert summary["test_mlm_span_acc_retrieval"] - summary["test_mlm_span_acc_closed_book"] == pytest.approx(gap,
                                                                                                          abs=1e-9)
    assert 0.0 < summary["test_mlm_vs_closed_book_p_paired_spans"] <= 1.0
    # The split by whether a final top-8 doc holds the span recombines into each model's accuracy.
    n_in = summary["test_mlm_tokens_span_in_top_8"]
    assert 0 < n_in < n
    for who in ("retrieval", "closed_book"):
        split = (summary[f"test_mlm_acc_{who}_span_in_top_8"] * n_in
                 + summary[f"test_mlm_acc_{who}_span_not_in_top_8"] * (n - n_in)) / n
        assert split == pytest.approx(summary[f"test_mlm_acc_{who}"], abs=1e-6)
    assert 0.0 <= summary["trainer_wait_share"] <= 1.0
    assert summary["max_staleness_steps"] <= REFRESH_EVERY


def test_retriever_learns(summary):
    chance = summary["test_chance_recall_at_8"]
    assert 0 < chance < 0.05
    assert summary["test_recall_at_8"] >= 5 * chance, summary
    assert summary["test_recall_at_8"] > summary["test_recall_at_8_start"], summary
    assert summary["dev_recall_at_8"] > summary["dev_recall_at_8_start"], summary


def test_index_is_refreshed(summary):
    assert summary["index_versions"] >= 2
    # 1 + one per refresh boundary (steps 5, 10) with inline refresh.
    assert summary["index_versions"] == 1 + (STEPS - 1) // REFRESH_EVERY


def test_metrics_rows(run, summary):
    rows = read_metrics(run)
    loss_rows = [r for r in rows if "loss" in r]
    assert len(loss_rows) == STEPS // LOG_EVERY
    for r in loss_rows:
        assert ROW_KEYS <= set(r), r
        assert np.isfinite(r["loss"]) and r["lr"] > 0 and r["wait_s"] >= 0 and r["staleness"] >= 0
        assert r["phase"] in ("warmup", "realm")
    # The global step counts ICT steps then REALM steps.
    assert [r["step"] for r in loss_rows] == [summary["ict_steps"] + s for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    versions = [r["index_version"] for r in rows if "index_version" in r]
    assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == summary["index_versions"]
    refreshes = [r["step"] for r in rows if r.get("event") == "refresh"]
    assert refreshes == [summary["ict_steps"] + s for s in range(REFRESH_EVERY, STEPS, REFRESH_EVERY)]
    assert any(r.get("phase") == "ict" and "dev_recall_at_k" in r for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="train.device=auto is a GPU here: tests/test_cuda_e2e.py")
def test_device_cpu_gives_the_default_losses(run, tmp_path):
    """Without CUDA, train.device=auto is the CPU: an explicit train.device=cpu run is the same run, bit for bit, also
    with train.deterministic=true (deterministic algorithms on: nothing this run does on the CPU lacks one)."""
    out = tmp_path / "cpu"
    try:
        main(["pretrain", "--recipe", "tiny", "--out", str(out), *ARGS, "--set", "train.device=cpu",
              "--set", "eval.closed_book_baseline=false", "--set", "train.deterministic=true"])
        assert torch.are_deterministic_algorithms_enabled()  # the launch set it (and left it for this process)
    finally:
        torch.use_deterministic_algorithms(False)
    default, cpu = read_metrics(run), read_metrics(out)
    losses = [r["loss"] for r in default if "loss" in r]
    assert losses and [r["loss"] for r in cpu if "loss" in r] == losses
    assert [r.get("ict_loss") for r in cpu] == [r.get("ict_loss") for r in default]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_recall_at_8"] == json.loads((run / "summary.json").read_text())["test_recall_at_8"]


def test_run_files(run):
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "checkpoint" / "state.pt").is_file()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == STEPS and cfg["refresh"]["every"] == REFRESH_EVERY


def test_evaluate_reproduces_the_summary(run, summary, capsys):
    main(["evaluate", "--run", str(run)])
    result = json.loads((run / "eval.json").read_text())
    for key in ("test_recall_at_8", "test_mlm_acc_retrieval", "test_chance_recall_at_8", "test_span_in_top_8",
                "test_examples", "dev_recall_at_8", "dev_mlm_acc_retrieval", "dev_examples"):
        assert result[key] == pytest.approx(summary[key], abs=1e-9), key
    assert "test_recall_at_8" in capsys.readouterr().out


def test_build_index_matches_the_run_doc_encoder(run, summary, index_dir):
    from realm_hpc.runs import load_run
    from realm_hpc.retrieval.index import encode_blocks

    meta = json.loads((index_dir / "meta.json").read_text())
    emb = np.load(index_dir / "embeddings.npy")
    assert emb.shape == (summary["corpus_docs"], meta["dim"]) == (meta["count"], meta["dim"])
    assert emb.dtype == np.float32
    cfg, data, model = load_run(str(run))
    expected = encode_blocks(model.retriever.doc, data.blocks, cfg.refresh.batch_size).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)


def test_retrieve_ranks_like_the_run_query_encoder(run, index_dir, capsys):
    from realm_hpc.runs import load_run

    cfg, data, model = load_run(str(run))
    question = data.train.text[0]
    capsys.readouterr()
    main(["retrieve", "--index", str(index_dir), "--k", "5", question])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    ranks, scores, ids = [], [], []
    for line in lines:
        rank, score, doc_id, _title = line.split(maxsplit=3)
        ranks.append(int(rank)), scores.append(float(score)), ids.append(doc_id)
    assert ranks == [1, 2, 3, 4, 5] and scores == sorted(scores, reverse=True)
    enc = data.tokenizer([question], truncation=True, max_length=cfg.model.query_len, return_tensors="pt")
    with torch.no_grad():
        q = model.retriever.query(enc["input_ids"], enc["attention_mask"])
    emb = torch.from_numpy(np.load(index_dir / "embeddings.npy"))
    top = torch.topk((emb @ q[0]), 5).indices.tolist()
    assert ids == [data.blocks.doc_id(i) for i in top]


def test_retrieve_refuses_a_tampered_index(index_dir, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(index_dir, tampered)
    emb_path = tampered / "embeddings.npy"
    raw = bytearray(emb_path.read_bytes())
    raw[-1] ^= 0x01  # one bit of one float
    emb_path.write_bytes(bytes(raw))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["retrieve", "--index", str(tampered), "--k", "3", "who was born in 1890"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "checksum" in captured.err and "embeddings.npy" in captured.err
    assert captured.out == ""


def test_cli_errors_on_bad_paths_and_k(index_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--run", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["retrieve", "--index", str(tmp_path), "who"])
    assert exit_.value.code == 2 and "meta.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["retrieve", "--index", str(index_dir), "--k", "0", "who"])
    assert exit_.value.code == 2 and "--k" in capsys.readouterr().err


def test_pca_start_index_and_a_retriever_realm_never_trains(tmp_path, monkeypatch):
    """model.proj_init=pca: the start index is exactly the PCA-initialised doc encoder's encoding of the corpus (one
    pass over the corpus, no second encode); a retriever frozen for the whole run is evaluated on that index."""
    import realm_hpc.train as train
    from realm_hpc.checkpoint import load_checkpoint
    from realm_hpc.config import apply_overrides
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.models.realm import Realm
    from realm_hpc.recipes import get_recipe
    from realm_hpc.retrieval.index import encode_blocks

    encodes = []
    real = train.fresh_index
    monkeypatch.setattr(train, "fresh_index", lambda *a, **kw: encodes.append(a[3]) or real(*a, **kw))
    out = tmp_path / "pca"
    sets = ["ict.steps=0", "model.proj_init=pca", "model.proj_dim=32", "model.normalize=true", "train.reader_warmup_steps=2",
            "train.retriever_freeze_steps=100", "refresh.every=1000", "train.eval_every=1000",
            "train.checkpoint_every=1000", "eval.closed_book_baseline=false"]
    main(["pretrain", "--recipe", "tiny", "--out", str(out), "--steps", "6"] + [x for s in sets for x in ("--set", s)])
    summary = json.loads((out / "summary.json").read_text())
    assert encodes == []  # neither a random-projection start index nor a final re-encode
    assert summary["test_recall_at_8"] == summary["test_recall_at_8_start"]
    assert summary["dev_recall_at_8"] == summary["dev_recall_at_8_start"]
    evals = [r for r in read_metrics(out) if "test_mlm_acc" in r]  # the run's end is evaluated once, on the final index
    assert len(evals) == 1 and evals[0]["index_version"] == 1 and evals[0]["step"] == 6
    assert (evals[0]["test_recall_at_k"], evals[0]["test_mlm_acc"]) == (summary["test_recall_at_8"],
                                                                        summary["test_mlm_acc_retrieval"])
    ckpt = load_checkpoint(out / "checkpoint")
    cfg = apply_overrides(get_recipe("tiny"), sets)
    model = Realm(cfg, PretrainData(cfg, out).vocab_size)
    model.load_state_dict(ckpt["model"])
    w = model.retriever.doc.proj.weight.detach()
    torch.testing.assert_close(w @ w.T, cfg.model.pca_score_scale * torch.eye(w.shape[0]), atol=1e-3, rtol=1e-4)
    blocks = PretrainData(cfg, out).blocks
    torch.testing.assert_close(encode_blocks(model.retriever.doc, blocks, 64), ckpt["index"]["embeddings"],
                               atol=1e-4, rtol=1e-4)


def test_frozen_doc_encoder_keeps_the_start_index_and_build_index_start_rebuilds_the_start(tmp_path, monkeypatch):
    """train.freeze_doc_encoder: REALM trains the query encoder only and reads the top-k from the index, which then
    is exact all run: no encode after the start one, the final index is the start's. eval.bm25_baseline adds BM25's
    recall@1/k/20 on test beside the start's and the trained retriever's. `build-index --run DIR --start` rebuilds
    the retriever the run started from (ict.steps=0): the run's own doc embeddings, an untrained query encoder."""
    import realm_hpc.train as train
    from realm_hpc.retrieval.store import open_index

    encodes = []
    real = train.fresh_index
    monkeypatch.setattr(train, "fresh_index", lambda *a, **kw: encodes.append(a[3]) or real(*a, **kw))
    out = tmp_path / "frozen"
    sets = ["ict.steps=0", "model.proj_init=pca", "model.proj_dim=32", "model.normalize=true",
            "train.freeze_doc_encoder=true", "train.reader_warmup_steps=2", "refresh.every=1000",
            "train.eval_every=3", "train.checkpoint_every=1000", "eval.closed_book_baseline=false",
            "eval.bm25_baseline=true"]
    main(["pretrain", "--recipe", "tiny", "--out", str(out), "--steps", "6"] + [x for s in sets for x in ("--set", s)])
    summary = json.loads((out / "summary.json").read_text())
    assert encodes == []  # the start index is the PCA pass; no re-encode at the end
    for who in ("", "_start", "bm25_"):
        got = [summary[f"test_{who}recall_at_{j}" if who == "bm25_" else f"test_recall_at_{j}{who}"]
               for j in (1, 8, 20)]
        assert 0.0 <= got[0] <= got[1] <= got[2] <= 1.0, (who, got)
    assert summary["test_bm25_recall_at_20"] > 0  # the world's facts are stated in other documents, in other words
    dev = [r for r in read_metrics(out) if "dev_recall_at_k" in r]  # start, steps 3 and 6 (the end)
    assert [r["step"] for r in dev] == [0, 3, 6] and all({"dev_recall_at_1", "dev_recall_at_20"} <= set(r) for r in dev)

    trained, start = tmp_path / "trained_index", tmp_path / "start_index"
    main(["build-index", "--run", str(out), "--out", str(trained)])
    main(["build-index", "--run", str(out), "--start", "--out", str(start)])
    trained, start = open_index(trained), open_index(start)
    torch.testing.assert_close(start.embeddings(), trained.embeddings(), atol=1e-5, rtol=1e-5)  # the frozen doc encoder
    questions = ["Where was Kessler born?", "Which company employs Tamnor?"]
    assert not torch.allclose(start.embed(questions), trained.embed(questions))  # REALM trained the query encoder
    # The rebuilt start is the run's start: its query encoder on the test queries gives the summary's start recall.
    from realm_hpc.config import load_config
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.evaluate import recall_at_k
    from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex

    cfg = load_config(str(out / "config.json"))
    data = PretrainData(cfg, out, build=False)
    model, emb = train.rebuild_start(cfg, data)  # from the config (one pass over the corpus), not the checkpoint
    assert recall_at_k(model, data, LiveIndex(IndexSnapshot(emb, 0, 0)), 8, split="test") == summary[
        "test_recall_at_8_start"]
    torch.testing.assert_close(emb, start.embeddings(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # ... and equals the start that build-index took from the frozen run's checkpoint
        torch.testing.assert_close(model.retriever.query(*_encoded(data, questions)), start.embed(questions),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit) as exit_:
        main(["build-index", "--run", str(tmp_path / "nowhere"), "--start", "--backend", "bm25", "--out",
              str(tmp_path / "x")])
    assert exit_.value.code == 2


def _encoded(data, questions):
    enc = data.tokenizer(questions, truncation=True, max_length=data.cfg.model.query_len, padding=True,
                         return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
