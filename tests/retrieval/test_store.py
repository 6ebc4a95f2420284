"""Index files: build -> save -> load round trip for every backend and storage dtype, refusal of torn or altered
files (the faiss file included), build-index from --checkpoint + --corpus, and retrieve --queries' JSONL."""

import json
import shutil

import numpy as np
import pytest
import torch

from realm_hpc.cli import main
from realm_hpc.runs import load_run
from realm_hpc.retrieval.backends import build_backend, recall_at_k
from realm_hpc.retrieval.index import encode_blocks
from realm_hpc.retrieval.store import FAISS_FILE, SavedIndex, build_index

faiss = pytest.importorskip("faiss")

GRID = [("exact", "fp32"), ("exact", "fp16"), ("exact", "bf16"), ("faiss-flat", "fp32"), ("faiss-flat", "bf16"),
        ("faiss-ivfpq", "fp32"), ("faiss-ivfpq", "fp16")]
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
K = 5


@pytest.fixture(scope="module")
def loaded(tiny_run):
    cfg, data, model = load_run(str(tiny_run))
    emb = encode_blocks(model.retriever.doc, data.blocks, cfg.refresh.batch_size)
    return cfg, data, model, emb


@pytest.fixture(scope="module")
def indexes(loaded, tmp_path_factory):
    cfg, data, model, _ = loaded
    root = tmp_path_factory.mktemp("indexes")
    out = {}
    for backend, dtype in GRID:
        cfg.index.backend, cfg.index.dtype = backend, dtype
        cfg.index.nprobe = 4 if backend == "faiss-ivfpq" else 0  # every list: the test checks the round trip
        out[backend, dtype] = build_index(model, data.blocks, data.tokenizer, cfg, root / f"{backend}-{dtype}")
    cfg.index.backend, cfg.index.dtype, cfg.index.nprobe = "exact", "fp32", 0
    return out


@pytest.mark.parametrize("backend,dtype", GRID)
def test_round_trip(loaded, indexes, backend, dtype):
    cfg, data, model, emb = loaded
    index = SavedIndex.open(indexes[backend, dtype])
    assert (index.meta["backend"], index.meta["dtype"], len(index)) == (backend, dtype, len(data.blocks))
    stored = index.embeddings()
    assert stored.dtype == TORCH[dtype] and tuple(stored.shape) == (len(data.blocks), cfg.model.proj_dim)
    assert torch.equal(stored, emb.to(TORCH[dtype]))  # exactly the encoder's output, rounded once
    assert [index.doc_ids[i] for i in range(len(index))] == [data.blocks.doc_id(i) for i in range(len(index))]
    assert [index.titles[i] for i in range(len(index))] == [data.blocks.title(i) for i in range(len(index))]
    assert (FAISS_FILE in index.meta["files"]) == (backend != "exact")

    questions = data.train.text[:16]
    q = index.embed(questions)
    with torch.no_grad():
        enc = data.tokenizer(questions, truncation=True, max_length=cfg.model.query_len, padding=True,
                             return_tensors="pt")
        np.testing.assert_allclose(q, model.retriever.query(enc["input_ids"], enc["attention_mask"]), atol=1e-5)
    scores, ids = index.backend().search(q, K)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    rows = stored.float()
    truth = build_backend("exact", rows).search(q, K)[0]
    if backend == "exact":  # the loaded backend is the in-memory one over the same rows
        fresh = build_backend("exact", emb.to(TORCH[dtype])).search(q, K)
        assert torch.equal(ids, fresh[1]) and torch.equal(scores, fresh[0])
    elif backend == "faiss-flat":
        assert recall_at_k(ids, q, rows, truth) == 1.0
    else:
        assert index.backend().params["nprobe"] == index.meta["backend_params"]["nprobe"] == 4
        assert recall_at_k(ids, q, rows, truth) >= 0.9
    hits = index.search(questions[:2], K)
    assert [h[0] for h in hits[0]] == [index.doc_ids[i] for i in ids[0].tolist()]


def _copy(indexes, tmp_path, key=("faiss-ivfpq", "fp32")):
    dst = tmp_path / "copy"
    shutil.copytree(indexes[key], dst)
    return dst


def test_truncated_faiss_file_is_refused(indexes, tmp_path):
    idx = _copy(indexes, tmp_path)
    with open(idx / FAISS_FILE, "r+b") as f:
        f.truncate((idx / FAISS_FILE).stat().st_size - 100)
    with pytest.raises(ValueError, match=r"index\.faiss: .* bytes, meta\.json says .*truncated"):
        SavedIndex.open(idx)


def test_altered_faiss_file_is_refused(indexes, tmp_path, capsys):
    idx = _copy(indexes, tmp_path)
    raw = bytearray((idx / FAISS_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, same size
    (idx / FAISS_FILE).write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as exc:
        main(["retrieve", "--index", str(idx), "--k", "3", "who"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "index.faiss" in err and "checksum" in err


@pytest.mark.parametrize("name", ["embeddings.npy", "titles.npy", "query_encoder.pt"])
def test_altered_or_missing_files_are_refused(indexes, tmp_path, name):
    idx = _copy(indexes, tmp_path, ("exact", "bf16"))
    raw = bytearray((idx / name).read_bytes())
    raw[-1] ^= 0x01
    (idx / name).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        SavedIndex.open(idx)
    (idx / name).unlink()
    with pytest.raises(ValueError, match="missing"):
        SavedIndex.open(idx)


def test_build_index_cli_from_run(tiny_run, loaded, tmp_path, capsys):
    _, data, _, emb = loaded
    out = tmp_path / "idx"
    main(["build-index", "--run", str(tiny_run), "--out", str(out), "--backend", "faiss-flat", "--dtype", "fp16",
          "--set", "index.k_factor=4"])
    assert "wrote" in capsys.readouterr().out
    index = SavedIndex.open(out)
    assert (index.meta["backend"], index.meta["dtype"], index.cfg.index.k_factor) == ("faiss-flat", "fp16", 4)
    assert np.load(out / "embeddings.npy").dtype == np.float16
    assert torch.equal(index.embeddings(), emb.half())
    assert not list(tmp_path.glob(".idx*")), "no temp directory left beside the index"


def test_build_index_cli_from_checkpoint_and_corpus(tiny_run, loaded, tmp_path):
    _, _, model, _ = loaded
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"id": f"d{i}", "title": f"Title {i}", "text": f"Document number {i} was born in {1800 + i}."}
            for i in range(12)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "idx"
    main(["build-index", "--checkpoint", str(tiny_run / "checkpoint"), "--corpus", str(corpus), "--out", str(out),
          "--dtype", "bf16"])
    index = SavedIndex.open(out)
    assert len(index) == 12 and index.meta["dtype"] == "bf16" and index.embeddings().dtype == torch.bfloat16
    assert [index.doc_ids[i] for i in range(12)] == [d["id"] for d in docs]
    assert [index.titles[i] for i in range(12)] == [d["title"] for d in docs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "idx"]  # the temp block store is gone
    # the checkpoint's doc encoder, on the corpus tokenized with the run's tokenizer
    from realm_hpc.data.blocks import BlockStore
    from realm_hpc.data.corpus import read_corpus

    from realm_hpc.data.tokenizer import load_tokenizer

    blocks = BlockStore.build(read_corpus(corpus), load_tokenizer(tiny_run / "data" / "tokenizer"), tmp_path / "b",
                              max_len=index.cfg.model.block_len)
    expected = encode_blocks(model.retriever.doc, blocks, 8)
    assert torch.equal(index.embeddings(), expected.bfloat16())


def test_build_index_cli_errors(tiny_run, tmp_path, capsys):
    for args in (["--checkpoint", str(tiny_run / "checkpoint")], ["--corpus", "x.jsonl"],
                 ["--run", str(tiny_run), "--checkpoint", str(tiny_run / "checkpoint"), "--corpus", "x.jsonl"]):
        with pytest.raises(SystemExit) as exc:
            main(["build-index", *args, "--out", str(tmp_path / "idx")])
        assert exc.value.code == 2 and "--checkpoint DIR with --corpus FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build-index", "--run", str(tiny_run), "--out", str(tmp_path / "idx"), "--backend", "hnsw"])
    assert "index.backend" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


# -- retrieve --queries ------------------------------------------------------------------------------------------

def test_retrieve_queries_jsonl(indexes, tmp_path, capsys):
    idx = indexes["faiss-flat", "fp32"]
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "who was born in 1890"}\n\n{"query": "which city"}\n'
                       '{"id": 7, "text": "an organisation"}\n')
    out = tmp_path / "out.jsonl"
    main(["retrieve", "--index", str(idx), "--queries", str(queries), "--k", "4", "--out", str(out),
          "--batch-size", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["question"]) for r in rows] == [("a", "who was born in 1890"), (3, "which city"),
                                                         (7, "an organisation")]
    index = SavedIndex.open(idx)
    for r in rows:
        assert set(r) == {"id", "question", "doc_ids", "titles", "scores"}
        assert len(r["doc_ids"]) == len(r["titles"]) == len(r["scores"]) == 4
        assert r["scores"] == sorted(r["scores"], reverse=True)
        single = index.retrieve(r["question"], 4)
        assert r["doc_ids"] == [h[0] for h in single] and r["titles"] == [h[1] for h in single]
        np.testing.assert_allclose(r["scores"], [h[2] for h in single], rtol=1e-5)
    # plain text, JSONL on stdout
    text = tmp_path / "q.txt"
    text.write_text("who was born in 1890\nwhich city\n")
    capsys.readouterr()
    main(["retrieve", "--index", str(idx), "--queries", str(text), "--k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2]


@pytest.mark.parametrize("line,reason", [("{not json", "bad JSON"), ('{"id": "x"}', "no question"),
                                         ('["who"]', "expected a JSON object"), ('{"question": ""}', "non-empty"),
                                         ('{"id": [1], "question": "who"}', "'id' must be")])
def test_retrieve_queries_malformed_line(indexes, tmp_path, capsys, line, reason):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"question": "who"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(["retrieve", "--index", str(indexes["exact", "fp32"]), "--queries", str(queries), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {queries}:2: ") and reason in err
    assert not out.exists()


def test_retrieve_needs_one_of_question_and_queries(indexes, tmp_path, capsys):
    for args in ([], ["who", "--queries", str(tmp_path / "q.txt")], ["   "]):
        with pytest.raises(SystemExit) as exc:
            main(["retrieve", "--index", str(indexes["exact", "fp32"]), *args])
        assert exc.value.code == 2 and "--queries" in capsys.readouterr().err
