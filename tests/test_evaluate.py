"""Held-out metrics: span_in_top_k against a brute force, the per-token MLM hits, the per-span hits built from them,
and the paired test."""

import pytest
import torch

from realm_hpc.config import apply_overrides
from realm_hpc.data.examples import PretrainData
from realm_hpc.evaluate import (mlm_accuracy, mlm_token_hits, paired_sign_test, per_example, per_token, recall_at_k,
                                retrieval_metrics, share, spans_in_top_k)
from realm_hpc.models.realm import Realm
from realm_hpc.recipes import get_recipe
from realm_hpc.train import fresh_index


@pytest.fixture(scope="module")
def setup(small_world, tmp_path_factory):
    cfg = apply_overrides(get_recipe("tiny"), small_world + ["data.eval_examples=30", "data.dev_examples=0"])
    data = PretrainData(cfg, tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    model = Realm(cfg, data.vocab_size)
    return cfg, data, model, fresh_index(model, data, cfg, 0, 0)


def _holds(data, doc: int, span) -> bool:
    """Brute force on strings: the span's token ids, space-joined, inside the block's (without its [CLS])."""
    text = " " + " ".join(map(str, data.blocks.tokens(doc)[1:].tolist())) + " "
    return " " + " ".join(map(str, span.tolist())) + " " in text


def test_span_in_top_k_matches_a_brute_force_and_grows_with_k(setup):
    cfg, data, model, index = setup
    n_docs = len(data.blocks)
    shares = {k: share(spans_in_top_k(model, data, index, k, split="test")) for k in (1, 4, n_docs - 1)}
    assert shares[1] <= shares[4] <= shares[n_docs - 1]
    # All documents but the source: the share of spans that occur anywhere else in the corpus.
    anywhere = [any(_holds(data, d, e.sentence.ids[e.span[0]:e.span[1]]) for d in range(n_docs) if d != e.source)
                for e in data.heldout("test")]
    assert shares[n_docs - 1] == pytest.approx(sum(anywhere) / len(anywhere))
    # The held-out facts are stated elsewhere in the world (their gold documents): most spans occur somewhere.
    assert shares[n_docs - 1] > 0.5
    with torch.no_grad():
        q = model.eval().retriever.query(*next(iter(_queries(data))))  # eval mode, as spans_in_top_k encodes
    assert q.shape[0] == len(data.heldout("test"))
    _, top = index.search(q, 4, torch.tensor([e.source for e in data.heldout("test")]))
    brute = [any(_holds(data, d, e.sentence.ids[e.span[0]:e.span[1]]) for d in row)
             for e, row in zip(data.heldout("test"), top.tolist())]
    assert shares[4] == pytest.approx(sum(brute) / len(brute))


def _queries(data):
    for _, batch in data.eval_batches("test", len(data.heldout("test"))):
        yield batch.query_ids, batch.query_mask


def test_mlm_token_hits_pair_up_token_by_token_and_give_the_accuracy(setup):
    """One hit per held-out masked token, in a fixed order: the same model twice gives the same vector, and its
    mean is mlm_accuracy. A model that reads nothing (closed book) lines up with it token for token."""
    cfg, data, model, index = setup
    hits = mlm_token_hits(model, data, index, 2, split="test")
    n_tokens = sum(e.span[1] - e.span[0] for e in data.heldout("test"))
    assert hits.dtype == torch.bool and hits.shape == (n_tokens,)
    assert torch.equal(hits, mlm_token_hits(model, data, index, 2, split="test", batch_size=7))
    assert mlm_accuracy(model, data, index, 2, split="test") == pytest.approx(hits.float().mean().item())
    assert mlm_token_hits(model, data, None, 0, split="test").shape == hits.shape
    # Example flags spread over each example's masked tokens line up with the hits.
    reach = spans_in_top_k(model, data, index, 2, split="test")
    flags = per_token(data, reach, split="test")
    assert flags.shape == hits.shape and len(reach) == len(data.heldout("test"))
    assert share(reach) == pytest.approx(sum(reach) / len(reach))
    # One search gives both retrieval metrics, the same as the two functions on their own, and recall at 1, k and 20
    # from that one search equals a search at each depth.
    recalls, reach_again = retrieval_metrics(model, data, index, 2, split="test")
    assert reach_again == reach and sorted(recalls) == [1, 2, 20]
    assert recalls == {j: recall_at_k(model, data, index, j, split="test") for j in (1, 2, 20)}
    assert recalls[1] <= recalls[2] <= recalls[20] and recalls[20] > recalls[1]
    assert int(flags.sum()) == sum(e.span[1] - e.span[0] for e, r in zip(data.heldout("test"), reach) if r)


@pytest.mark.parametrize("only_a, only_b, both, p", [
    (8, 0, 5, 2 / 2 ** 8),  # 8 of 8 discordant trials favour a: 2 x (1/2)^8
    (3, 3, 0, 1.0),  # an even split is no evidence
    (0, 0, 9, 1.0),  # nothing discordant
    (1, 4, 2, 2 * (1 + 5) / 2 ** 5),  # P(X <= 1), X ~ Bin(5, 1/2), doubled
])
def test_paired_sign_test_counts_discordant_trials_and_gives_mcnemars_exact_p(only_a, only_b, both, p):
    neither = 6
    a = torch.tensor([True] * only_a + [False] * only_b + [True] * both + [False] * neither)
    b = torch.tensor([False] * only_a + [True] * only_b + [True] * both + [False] * neither)
    assert paired_sign_test(a, b) == (only_a, only_b, pytest.approx(p))
    assert paired_sign_test(b, a) == (only_b, only_a, pytest.approx(p))


def test_per_example_hits_pair_spans_not_tokens(setup):
    """A held-out span is right when all its tokens are. Two made-up models that differ on the tokens of the same
    few spans: paired per token, a long span's tokens would count as many trials; paired per span, once each."""
    cfg, data, model, index = setup
    counts = [e.span[1] - e.span[0] for e in data.heldout("test")]  # the small world's query_len cuts no span
    hits = mlm_token_hits(model, data, index, 2, split="test")
    assert sum(counts) == len(hits) and max(counts) >= 2
    spans = per_example(data, hits, split="test")
    assert spans.shape == (len(data.heldout("test")),)
    pieces = torch.split(hits, counts)
    assert spans.tolist() == [bool(p.all()) for p in pieces]
    round_trip = per_example(data, per_token(data, spans.tolist(), split="test"), split="test")
    assert round_trip.tolist() == spans.tolist()

    # a gets every token of the three longest spans right and b none of them; elsewhere they agree (all wrong).
    longest = sorted(range(len(counts)), key=lambda i: -counts[i])[:3]
    a = per_token(data, [i in longest for i in range(len(counts))], split="test")
    b = torch.zeros_like(a)
    assert paired_sign_test(a, b)[:2] == (sum(counts[i] for i in longest), 0)  # tokens: many "independent" wins
    by_span = per_example(data, a, split="test"), per_example(data, b, split="test")
    assert paired_sign_test(*by_span) == (3, 0, pytest.approx(2 / 2 ** 3))
    # One token of a span wrong makes the whole span wrong.
    first = sum(counts[:longest[0]])
    a[first] = False
    assert per_example(data, a, split="test").sum() == 2
    with pytest.raises(ValueError, match="token hits for"):
        per_example(data, hits[:-1], split="test")


def test_bm25_on_held_out_sentences_queries_without_the_span_and_never_returns_the_source(tmp_path):
    """eval.bm25_baseline on real sentences (the wiki question set's 407 articles): the query is the sentence with
    the masked span cut out, the source article never comes back, and the ranking is Lucene BM25's (a brute force
    over the same bm25s tokens). (Few sentences of 407 articles name another one's title: gold recall is checked on
    the wiki run itself.)"""
    from pathlib import Path

    import numpy as np
    from test_retrieval_eval import _brute_bm25  # same directory (pytest puts it on sys.path)

    from realm_hpc.evaluate import bm25_retrieved, gold_recalls

    corpus = Path(__file__).parent / "fixtures" / "wiki_qa" / "corpus.jsonl"
    cfg = apply_overrides(get_recipe("tiny"), [f"data.corpus={corpus}", "data.eval_examples=50",
                                               "data.dev_examples=0", "model.vocab_size=3000"])
    data = PretrainData(cfg, tmp_path)
    examples = data.heldout("test")
    assert len(examples) >= 40
    for e in examples:
        a, b = e.sentence.offsets[e.span[0]][0], e.sentence.offsets[e.span[1] - 1][1]
        assert e.text_without_span() == f"{e.text[:a].rstrip()} {e.text[b:].lstrip()}".strip()
        assert len(e.text_without_span()) <= len(e.text) - (b - a) + 1  # one space where the span was
    retrieved = bm25_retrieved(data, 20, split="test")
    assert [e for e, _ in retrieved] == examples
    scores = _brute_bm25(data.docs, [e.text_without_span() for e in examples])
    for (e, rows), s in zip(retrieved, scores):
        assert len(rows) == 20 and e.source not in rows and len(set(rows)) == 20
        s[e.source] = -np.inf
        got = s[rows]
        assert np.all(np.diff(got) <= 1e-4) and got[0] == pytest.approx(s.max(), abs=1e-4)
        assert got[-1] >= np.sort(s)[-20] - 1e-4  # nothing outside the 20 scores above the 20th
    # Gold recall reads the rows: a gold at rank 3 counts from recall@4 on.
    (e, rows), *_ = retrieved
    pretend = [(type(e)(e.sentence, e.span, e.source, [rows[2]], e.text), rows)]
    assert gold_recalls(pretend, (1, 3, 4, 20)) == {1: 0.0, 3: 1.0, 4: 1.0, 20: 1.0}
