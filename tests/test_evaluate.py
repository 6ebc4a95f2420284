"""span_in_top_k: the share of held-out masked spans that a retrieved document holds, against a brute force."""

import pytest
import torch

from realm_hpc.config import apply_overrides
from realm_hpc.data.examples import PretrainData
from realm_hpc.evaluate import span_in_top_k
from realm_hpc.models.realm import Realm
from realm_hpc.recipes import get_recipe
from realm_hpc.train import fresh_index


@pytest.fixture(scope="module")
def setup(small_world, tmp_path_factory):
    cfg = apply_overrides(get_recipe("tiny"), small_world + ["data.eval_examples=30"])
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
    shares = {k: span_in_top_k(model, data, index, k) for k in (1, 4, n_docs - 1)}
    assert shares[1] <= shares[4] <= shares[n_docs - 1]
    # All documents but the source: the share of spans that occur anywhere else in the corpus.
    anywhere = [any(_holds(data, d, e.sentence.ids[e.span[0]:e.span[1]]) for d in range(n_docs) if d != e.source)
                for e in data.eval]
    assert shares[n_docs - 1] == pytest.approx(sum(anywhere) / len(anywhere))
    # The held-out facts are stated elsewhere in the world (their gold documents): most spans occur somewhere.
    assert shares[n_docs - 1] > 0.5
    with torch.no_grad():
        q = model.eval().retriever.query(*next(iter(_queries(data))))  # eval mode, as span_in_top_k encodes
    assert q.shape[0] == len(data.eval)
    _, top = index.search(q, 4, torch.tensor([e.source for e in data.eval]))
    brute = [any(_holds(data, d, e.sentence.ids[e.span[0]:e.span[1]]) for d in row)
             for e, row in zip(data.eval, top.tolist())]
    assert shares[4] == pytest.approx(sum(brute) / len(brute))


def _queries(data):
    for _, batch in data.eval_batches(len(data.eval)):
        yield batch.query_ids, batch.query_mask
