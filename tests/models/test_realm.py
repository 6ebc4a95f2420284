from dataclasses import replace

import numpy as np
import pytest
import torch

from realm_hpc.config import apply_overrides
from realm_hpc.data.examples import PretrainData
from realm_hpc.models.realm import Realm
from realm_hpc.recipes import get_recipe
from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex
from realm_hpc.train import fresh_index

K = 3
SMALL = ["data.world_people=40", "data.world_orgs=8", "data.world_cities=6", "data.world_surnames=8",
         "data.heldout_facts=10", "data.eval_examples=10", "model.vocab_size=300", "model.hidden=32",
         "model.intermediate=64", "model.layers=1", "model.proj_dim=16", "model.block_len=64",
         "model.query_len=32", "model.reader_len=96"]


@pytest.fixture(scope="module")
def cfg():
    return apply_overrides(get_recipe("tiny"), SMALL)


@pytest.fixture(scope="module")
def data(cfg, tmp_path_factory):
    return PretrainData(cfg, tmp_path_factory.mktemp("run"))


@pytest.fixture
def model(cfg, data):
    torch.manual_seed(0)
    return Realm(cfg, data.vocab_size)


def _batch_with_distinct_sources(data, size=4):
    for step in range(50):
        batch = data.train_batch(step, size, seed=0)
        if len(set(batch.source.tolist())) == size:
            return batch
    raise AssertionError("no batch with distinct source blocks in 50 steps")


def test_forward_returns_k_docs_plus_the_null_doc_last(cfg, data, model):
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, cfg, 1, 0)
    out = model(batch, data, live, K, train_retriever=True)
    B = batch.query_ids.size(0)
    assert out.doc_ids.shape == (B, K + 1) and out.scores.shape == (B, K + 1)
    assert out.reader_logprob.shape == (B, K + 1) and out.log_marginal.shape == (B,)
    assert (out.doc_ids[:, -1] == -1).all()
    assert (out.doc_ids[:, :-1] >= 0).all()
    assert all(len(set(row)) == K for row in out.doc_ids[:, :-1].tolist())
    assert torch.isfinite(out.log_marginal).all() and (out.log_marginal <= 0).all()
    # The marginal is log sum_z p(z|x) p(y|z,x) over exactly these docs.
    expected = torch.logsumexp(torch.log_softmax(out.scores.float(), 1) + out.reader_logprob, 1)
    torch.testing.assert_close(out.log_marginal, expected, atol=1e-5, rtol=1e-5)

    # The reader sees [CLS] x [SEP] z: block z's tokens after the query; the null doc adds nothing but [SEP].
    inp = out.reader_inputs
    ids = inp["input_ids"].view(B, K + 1, -1)
    for b in range(B):
        head = [data.cls_id, *batch.x_tokens[b].tolist(), data.sep_id]
        for j, d in enumerate(out.doc_ids[b].tolist()):
            row = [t for t in ids[b, j].tolist() if t != data.pad_id]
            assert row[:len(head)] == head
            if d < 0:
                assert row[len(head):] == [data.sep_id]
            else:
                block = data.blocks.tokens(d)[1:].tolist()
                assert row[len(head):] == block[:len(row) - len(head)]
    assert not inp["doc_mask"].view(B, K + 1, -1)[:, -1].any()


def test_source_block_is_never_retrieved_even_when_it_is_the_best_match(cfg, data, model):
    model.eval()
    batch = _batch_with_distinct_sources(data)
    with torch.no_grad():
        q = model.retriever.query(batch.query_ids, batch.query_mask)
    gen = torch.Generator().manual_seed(0)
    emb = 0.01 * torch.randn(len(data.blocks), cfg.model.proj_dim, generator=gen)
    # Each query's own source block is its best match. Untrained queries point almost the same way, so the rows are
    # normalised: with 10 * q a long query's row would be every query's best match.
    emb[batch.source] = 10 * q / q.norm(dim=1, keepdim=True)
    live = LiveIndex(IndexSnapshot(emb, 1, 0))
    with torch.no_grad():
        # Without the exclusion the source comes first: the set-up is not vacuous.
        allowed = model(batch, data, live, K, train_retriever=False, exclude_source=False)
        assert allowed.doc_ids[:, 0].tolist() == batch.source.tolist()
        for train_retriever in (False, True):
            out = model(batch, data, live, K, train_retriever=train_retriever)
            for b, row in enumerate(out.doc_ids.tolist()):
                assert batch.source[b].item() not in row
                assert len(row) == K + 1 and row[-1] == -1
                assert all(d >= 0 for d in row[:-1]) and len(set(row[:-1])) == K
                # The K docs are the best K of the others, in order.
                others = emb @ q[b]
                others[batch.source[b]] = -float("inf")
                assert row[:-1] == torch.topk(others, K).indices.tolist()
        stale = model(batch, data, live, K, train_retriever=False)
    # With the retriever frozen the scores are the stale index's inner products.
    expected = torch.einsum("bp,bkp->bk", q, emb[stale.doc_ids[:, :-1]])
    torch.testing.assert_close(stale.scores[:, :-1], expected, atol=1e-4, rtol=1e-5)


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_gradients_reach_reader_and_both_encoders_when_training_the_retriever(cfg, data, model):
    model.train()
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, cfg, 1, 0)
    loss = -model(batch, data, live, K, train_retriever=True).log_marginal.mean()
    loss.backward()
    assert _grad_norm(model.reader) > 0
    assert _grad_norm(model.retriever.query) > 0
    assert _grad_norm(model.retriever.doc) > 0


def test_frozen_retriever_gets_no_gradient(cfg, data, model):
    model.train()
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, cfg, 1, 0)
    loss = -model(batch, data, live, K, train_retriever=False).log_marginal.mean()
    loss.backward()
    assert _grad_norm(model.reader) > 0
    assert all(p.grad is None for p in model.retriever.parameters())


def test_a_frozen_doc_encoder_is_read_from_the_index_and_only_the_query_encoder_learns(cfg, data, model):
    """train.freeze_doc_encoder: the top-k's relevance is f(x)·g(z) with g(z) read from the index (what the doc
    encoder, kept in eval mode, gives: the same scores as re-encoding them), and the gradient reaches the query
    encoder and the reader, never the doc encoder."""
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, cfg, 1, 0)
    trained = Realm(cfg, data.vocab_size)
    trained.load_state_dict(model.state_dict())
    model.freeze_doc_encoder()
    model.train()
    assert model.training and model.retriever.query.training and not model.retriever.doc.training
    model.eval()  # no dropout in the query encoder either: the two models' scores are compared
    out = model(batch, data, live, K, train_retriever=True)
    re_encoded = trained.eval()(batch, data, live, K, train_retriever=True)
    assert torch.equal(out.doc_ids, re_encoded.doc_ids)
    torch.testing.assert_close(out.scores, re_encoded.scores, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        q = model.retriever.query(batch.query_ids, batch.query_mask)
    expected = torch.einsum("bp,bkp->bk", q, live.snapshot.embeddings[out.doc_ids[:, :-1]])
    torch.testing.assert_close(out.scores[:, :-1], expected, atol=1e-5, rtol=1e-5)
    (-out.log_marginal.mean()).backward()
    assert _grad_norm(model.reader) > 0 and _grad_norm(model.retriever.query) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.retriever.doc.parameters())


def test_query_anchor_measures_the_query_encoders_drift_on_the_unmasked_queries(cfg, data, model):
    """train.query_anchor: the loss adds weight x mean ||f(x) - g(x)||^2 over the batch's queries with their masked
    tokens put back, g the frozen doc encoder (where f started): zero at the start, positive once f moved, and its
    gradient reaches the query encoder only."""
    anchored = replace(cfg, train=replace(cfg.train, freeze_doc_encoder=True, query_anchor=2.0))
    model.cfg = anchored
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, anchored, 1, 0)
    model.freeze_doc_encoder()
    model.eval()  # no dropout: f and g are the same function at the start
    plain_rows = []
    for b in range(batch.query_ids.size(0)):  # the sentence's own tokens, [CLS] x [SEP], from the masked query
        row = batch.query_ids[b].clone()
        n = int(batch.target_mask[b].sum())
        row[batch.positions[b, :n] + 1] = batch.targets[b, :n]
        plain_rows.append(row)
    assert (torch.stack(plain_rows) != batch.query_ids).any() and not (torch.stack(plain_rows) == data.mask_id).any()
    out = model(batch, data, live, K, train_retriever=True)
    assert out.query_drift is not None and out.query_drift.item() == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        for p in model.retriever.query.proj.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = model(batch, data, live, K, train_retriever=True)
    with torch.no_grad():
        plain = torch.stack(plain_rows)
        expected = (model.retriever.query(plain, batch.query_mask) - model.retriever.doc(plain, batch.query_mask))
    assert out.query_drift.item() == pytest.approx(expected.pow(2).sum(-1).mean().item(), rel=1e-5)
    assert out.query_drift.item() > 0
    assert out.loss().item() == pytest.approx((-out.log_marginal.mean() + 2.0 * out.query_drift).item(), rel=1e-6)
    out.query_drift.backward()
    assert _grad_norm(model.retriever.query) > 0 and _grad_norm(model.reader) == 0
    assert all(p.grad is None for p in model.retriever.doc.parameters())
    assert model(batch, data, live, K, train_retriever=False).query_drift is None  # the warm-up: no retriever loss


def test_warmup_on_the_source_block_reads_it_and_scores_it_with_the_current_encoders(cfg, data, model):
    """train.warmup_source_block: the reader gets the query's own block (plus the null doc), whatever the index
    holds; its relevance is f(x)·g(z) of the current encoders, and the frozen retriever gets no gradient."""
    model.eval()  # no dropout: the scores are compared with a second encoding
    batch = _batch_with_distinct_sources(data)
    stale = LiveIndex(IndexSnapshot(torch.zeros(len(data.blocks), cfg.model.proj_dim), 1, 0))
    out = model(batch, data, stale, 1, train_retriever=False, docs=batch.source[:, None])
    assert out.doc_ids[:, 0].tolist() == batch.source.tolist() and (out.doc_ids[:, 1] == -1).all()
    with torch.no_grad():
        q = model.retriever.query(batch.query_ids, batch.query_mask)
        blocks = data.blocks.batch(batch.source.tolist())
        g = model.retriever.doc(blocks["input_ids"], blocks["attention_mask"])
    torch.testing.assert_close(out.scores[:, 0], (q * g).sum(1), atol=1e-5, rtol=1e-5)
    # The block holds the masked sentence: its tokens are in the reader's input after the query.
    row = out.reader_inputs["input_ids"][0].tolist()
    first_target = int(batch.targets[0, 0])
    assert first_target in row[row.index(data.sep_id) + 1:]
    (-out.log_marginal.mean()).backward()
    assert _grad_norm(model.reader) > 0
    assert all(p.grad is None for p in model.retriever.parameters())


def test_warmup_reads_the_source_block_then_the_top_searched_docs_without_it(cfg, data, model):
    """train.reader_warmup_k > 1 with the source block: block 0 is the source, the others are the index's top
    k - 1 with the source excluded (even though the warm-up allows retrieving it), then the null doc."""
    model.eval()
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, cfg, 1, 0)
    out = model(batch, data, live, K, train_retriever=False, exclude_source=False, docs=batch.source[:, None])
    assert out.doc_ids[:, 0].tolist() == batch.source.tolist() and (out.doc_ids[:, -1] == -1).all()
    with torch.no_grad():
        q = model.retriever.query(batch.query_ids, batch.query_mask)
    _, expected = live.search(q, K - 1, batch.source)
    assert out.doc_ids[:, 1:K].tolist() == expected.tolist()
    assert all(src not in row for src, row in zip(batch.source.tolist(), out.doc_ids[:, 1:].tolist()))


def test_per_doc_loss_trains_the_reader_on_every_doc_and_the_marginal_by_posterior(cfg, data, model):
    """train.warmup_loss: REALM's marginal hands each doc's reader log-likelihood the doc's posterior as its
    gradient weight (~0 on docs that do not hold the span); per_doc hands every doc (null doc included) 1/K."""
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, cfg, 1, 0)
    out = model(batch, data, live, K, train_retriever=False)
    B, Kn = out.reader_logprob.shape
    (g_marginal,) = torch.autograd.grad(out.loss(), out.reader_logprob, retain_graph=True)
    posterior = torch.softmax(torch.log_softmax(out.scores.float(), 1) + out.reader_logprob, 1)
    torch.testing.assert_close(g_marginal, -posterior.detach() / B, atol=1e-6, rtol=1e-5)
    (g_per_doc,) = torch.autograd.grad(out.loss(per_doc=True), out.reader_logprob)
    torch.testing.assert_close(g_per_doc, torch.full((B, Kn), -1.0 / (B * Kn)))
    torch.testing.assert_close(out.loss(per_doc=True), -out.reader_logprob.mean())


def test_closed_book_uses_only_the_null_doc(cfg, data):
    cb_cfg = replace(cfg, retrieval=replace(cfg.retrieval, enabled=False))
    torch.manual_seed(0)
    model = Realm(cb_cfg, data.vocab_size)
    batch = _batch_with_distinct_sources(data)
    live = fresh_index(model, data, cb_cfg, 1, 0)
    for index, k in ((live, K), (None, 0)):
        out = model(batch, data, index, k, train_retriever=False)
        assert out.doc_ids.tolist() == [[-1]] * batch.query_ids.size(0)
        assert not out.reader_inputs["doc_mask"].any()
        # One document: the marginal is the reader's likelihood itself.
        torch.testing.assert_close(out.log_marginal, out.reader_logprob[:, 0], atol=1e-5, rtol=1e-5)
    loss = -out.log_marginal.mean()
    loss.backward()
    assert _grad_norm(model.reader) > 0


def test_without_null_doc_the_reader_sees_k_docs(cfg, data):
    no_null = replace(cfg, retrieval=replace(cfg.retrieval, null_doc=False))
    torch.manual_seed(0)
    model = Realm(no_null, data.vocab_size)
    batch = _batch_with_distinct_sources(data)
    out = model(batch, data, fresh_index(model, data, no_null, 1, 0), K, train_retriever=False)
    assert out.doc_ids.shape == (batch.query_ids.size(0), K) and (out.doc_ids >= 0).all()


def test_predict_tokens_shape_and_range(cfg, data, model):
    model.eval()
    batch = _batch_with_distinct_sources(data)
    with torch.no_grad():
        out = model(batch, data, fresh_index(model, data, cfg, 1, 0), K, train_retriever=False)
    pred = model.predict_tokens(out)
    assert pred.shape == batch.targets.shape
    assert pred.dtype == torch.int64 and int(pred.min()) >= 0 and int(pred.max()) < data.vocab_size
    assert np.isfinite(out.log_marginal.numpy()).all()


def test_normalize_pools_to_a_unit_vector_before_the_projection(cfg, data):
    from realm_hpc.models.encoders import Encoder

    small = replace(cfg.model, normalize=True, proj_dim=cfg.model.hidden)
    torch.manual_seed(0)
    enc = Encoder(small, data.vocab_size, small.block_len).eval()
    with torch.no_grad():  # identity projection: the output is the pooled vector itself
        enc.proj.weight.copy_(torch.eye(small.hidden))
        enc.proj.bias.zero_()
    blocks = data.blocks.batch(range(5))
    with torch.no_grad():
        out = enc(blocks["input_ids"], blocks["attention_mask"])
        plain = Encoder(replace(small, normalize=False), data.vocab_size, small.block_len).eval()
        plain.load_state_dict(enc.state_dict())
        raw = plain(blocks["input_ids"], blocks["attention_mask"])
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5))  # the unnormalised pool is not unit length already
    torch.testing.assert_close(out, raw / raw.norm(dim=-1, keepdim=True))


def test_pca_projection_is_the_corpus_principal_subspace_scaled(cfg, data):
    """init_projection_pca: both encoders get orthogonal rows of norm sqrt(scale) and zero bias, the returned index
    is the doc projection of the pooled vectors, and for vectors that lie in a proj_dim-dimensional affine subspace
    the projection keeps every centred inner product, times the scale."""
    from realm_hpc.config import ConfigError

    torch.manual_seed(0)
    model = Realm(replace(cfg, model=replace(cfg.model, normalize=True)), data.vocab_size)
    P, H = cfg.model.proj_dim, cfg.model.hidden
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(H, P, generator=g))[0]
    pooled = torch.randn(H, generator=g) + torch.randn(200, P, generator=g) @ basis.T
    emb = model.retriever.init_projection_pca(pooled, 20.0)
    w = model.retriever.doc.proj.weight.detach()
    torch.testing.assert_close(w @ w.T, 20.0 * torch.eye(P), atol=1e-4, rtol=1e-4)
    for enc in (model.retriever.query, model.retriever.doc):
        assert torch.equal(enc.proj.weight, w) and not enc.proj.bias.any()
    torch.testing.assert_close(emb, model.retriever.doc.proj(pooled).detach())
    centred, emb_c = pooled - pooled.mean(0), emb - emb.mean(0)
    torch.testing.assert_close(emb_c @ emb_c.T, 20.0 * centred @ centred.T, atol=1e-3, rtol=1e-4)
    # The SVD's signs are fixed, so a second init gives the same weights.
    model.retriever.init_projection_pca(pooled, 20.0)
    assert torch.equal(model.retriever.doc.proj.weight, w)
    with pytest.raises(ConfigError, match="model.proj_dim"):
        model.retriever.init_projection_pca(pooled[:, : P // 2], 20.0)


def test_bf16_live_index_retrieves_near_top_docs_and_the_current_encoders_score_them(cfg, data, model):
    """index.live_dtype=bf16: half the bytes; every document it returns is a float32 top-k one up to bf16 rounding
    (an untrained model's near-ties may swap), the retrieved documents' relevance comes from the current encoders
    (so where it returns the float32 index's documents the loss is the same to the bit), and the stale scores of
    the frozen-retriever path are the float32 ones up to that rounding."""
    model.eval()
    batch = data.train_batch(0, 16, seed=0)
    fp32 = fresh_index(model, data, cfg, 1, 0)
    bf16 = fresh_index(model, data, replace(cfg, index=replace(cfg.index, live_dtype="bf16")), 1, 0)
    emb = fp32.snapshot.embeddings
    assert bf16.snapshot.embeddings.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.snapshot.embeddings.float(), emb, rtol=2 ** -8, atol=0)
    with torch.no_grad():
        q = model.retriever.query(batch.query_ids, batch.query_mask)
        exact = q @ emb.T
        # bf16 rounds q and g to 8 significant bits: a score moves by at most ~2^-8 of sum_i |q_i g_i|
        tol = 2 ** -7 * (q.abs() @ emb.abs().T)
        _, ids = bf16.search(q, K)
        kth = exact.topk(K, dim=1).values[:, -1:]
        assert (exact.gather(1, ids) >= kth - tol.max(dim=1, keepdim=True).values).all()

        out32 = model(batch, data, fp32, K, train_retriever=True)
        out16 = model(batch, data, bf16, K, train_retriever=True)
        docs = out16.doc_ids[:, :K]
        torch.testing.assert_close(out16.scores[:, :K], exact.gather(1, docs))  # re-scored, not the bf16 index's
        same = (out16.doc_ids == out32.doc_ids).all(dim=1)
        assert same.any() and torch.isfinite(out16.log_marginal).all()
        assert torch.equal(out16.log_marginal[same], out32.log_marginal[same])

        stale = model(batch, data, bf16, K, train_retriever=False)  # warm-up / frozen retriever: the index's scores
        assert torch.isfinite(stale.log_marginal).all()
        err = (stale.scores[:, :K] - exact.gather(1, stale.doc_ids[:, :K])).abs()
        assert (err <= tol.gather(1, stale.doc_ids[:, :K])).all()


def test_retriever_span_gate_trains_the_retriever_only_on_queries_whose_docs_hold_the_span(cfg, data, model):
    """train.retriever_span_gate: a query's retrieval scores carry gradient only where one of its docs holds every
    masked span (tokens in order); its reader terms always do. The source block holds the sentence it was cut from."""
    gated = replace(cfg, train=replace(cfg.train, retriever_span_gate=True))
    model.cfg = gated
    batch = _batch_with_distinct_sources(data)
    B = batch.query_ids.size(0)
    src = batch.source[:, None]
    null = torch.full((B, 1), -1)
    assert Realm.span_held(batch, data, torch.cat([src, null], 1)).all()
    assert not Realm.span_held(batch, data, null).any()
    # a block holds the span iff its tokens contain it: check against the blocks' own tokens
    live = fresh_index(model, data, gated, 1, 0)
    out = model(batch, data, live, K, train_retriever=True)
    held = Realm.span_held(batch, data, out.doc_ids)
    for b in range(B):
        n = int(batch.target_mask[b].sum())
        span = batch.targets[b, :n].numpy()
        text = [data.blocks.tokens(d)[1:] for d in out.doc_ids[b, :-1].tolist()]
        assert held[b] == any(any((t[i:i + n] == span).all() for i in range(len(t) - n + 1)) for t in text)
    # with the source block among its docs a query is held and its scores train the retriever
    out = model(batch, data, live, K, train_retriever=True, exclude_source=False, docs=src)
    assert Realm.span_held(batch, data, out.doc_ids).all()
    model.zero_grad()
    (-out.log_marginal[0]).backward()
    assert _grad_norm(model.retriever.query) > 0 and _grad_norm(model.reader) > 0
    out = model(batch, data, live, 1, train_retriever=True)  # top-1 only: most queries' doc lacks the span
    held = Realm.span_held(batch, data, out.doc_ids)
    assert torch.equal(out.span_held, held)
    for b in range(B):
        model.zero_grad()
        (-out.log_marginal[b]).backward(retain_graph=True)
        assert (_grad_norm(model.retriever.query) > 0) == bool(held[b]), b
        assert _grad_norm(model.reader) > 0
    assert not held.all(), "the check above needs a query whose top-1 lacks its span"
