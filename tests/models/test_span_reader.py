"""The Open-QA span marginal loss against a brute-force enumeration of documents and spans (float64)."""

import itertools
import math

import pytest
import torch

from realm_hpc.models.span_reader import qa_marginal_loss, span_log_softmax


def _brute_force(r, scores, valid, match):
    """-log sum_k sum_s p(k) p(s|k) [s matches], one question at a time, by explicit loops (no logsumexp)."""
    B, K, S = scores.shape
    per_question, used = [], []
    for b in range(B):
        p_doc = [math.exp(r[b, k]) for k in range(K)]
        z_doc = sum(p_doc)
        total = 0.0
        for k in range(K):
            z_span = sum(math.exp(scores[b, k, s]) for s in range(S) if valid[b, k, s])
            for s in range(S):
                if valid[b, k, s] and match[b, k, s]:
                    total += p_doc[k] / z_doc * math.exp(scores[b, k, s]) / z_span
        if total > 0:
            per_question.append(-math.log(total))
            used.append(b)
    return per_question, used


def _case(seed: int, B=4, K=3, S=6):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    scores = torch.randn(B, K, S, generator=g, dtype=torch.float64) * 2
    valid = torch.rand(B, K, S, generator=g) < 0.8
    valid[0, 1] = False  # a document with no candidate span at all (e.g. an empty block)
    match = (torch.rand(B, K, S, generator=g) < 0.3) & valid
    match[1] = False  # a question with no matching span in any retrieved document: skipped
    match[2, 0, :] = valid[2, 0, :]  # every valid span of a document matches
    match[3, :, :] = False
    match[3, 2, int(valid[3, 2].nonzero()[0])] = True  # exactly one matching span in one document
    return r, scores, valid, match


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_span_marginal_loss_matches_brute_force(seed):
    r, scores, valid, match = _case(seed)
    r.requires_grad_(True)
    scores.requires_grad_(True)
    loss, log_marginal, used = qa_marginal_loss(r, span_log_softmax(scores, valid), match)
    expected, expected_used = _brute_force(r.detach(), scores.detach(), valid, match)
    assert used.nonzero().flatten().tolist() == expected_used and 1 not in expected_used
    assert log_marginal.dtype == torch.float64
    assert torch.isneginf(log_marginal[1])
    torch.testing.assert_close(-log_marginal[used], torch.tensor(expected, dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(loss, torch.tensor(sum(expected) / len(expected), dtype=torch.float64))

    # Gradients against autograd through the explicit sum (probabilities, no log-sum-exp tricks).
    loss.backward()
    r2, s2 = r.detach().clone().requires_grad_(True), scores.detach().clone().requires_grad_(True)
    p_doc = torch.softmax(r2, dim=1)
    p_span = torch.exp(s2.masked_fill(~valid, -math.inf))
    p_span = p_span / p_span.sum(-1, keepdim=True).clamp_min(1e-300)
    total = (p_doc.unsqueeze(-1) * p_span * match).sum(dim=(1, 2))
    keep = total > 0
    (-torch.log(total[keep]).mean()).backward()
    torch.testing.assert_close(r.grad, r2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores.grad, s2.grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(r.grad).all() and torch.isfinite(scores.grad).all()
    assert (r.grad[1] == 0).all() and (scores.grad[1] == 0).all()  # the skipped question carries no gradient
    assert (scores.grad[~valid] == 0).all()


def test_every_matching_span_counts():
    # One document, spans with equal scores: the probability of the answer is (#matching spans) / (#spans).
    r = torch.zeros(1, 1, dtype=torch.float64)
    scores = torch.zeros(1, 1, 5, dtype=torch.float64)
    valid = torch.ones(1, 1, 5, dtype=torch.bool)
    for n_match in range(1, 6):
        match = torch.zeros(1, 1, 5, dtype=torch.bool)
        match[..., :n_match] = True
        loss, _, _ = qa_marginal_loss(r, span_log_softmax(scores, valid), match)
        assert loss.item() == pytest.approx(-math.log(n_match / 5), abs=1e-12)


def test_no_answerable_question_gives_zero_loss_and_gradient():
    r = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    loss, log_marginal, used = qa_marginal_loss(r, span_log_softmax(scores, valid), torch.zeros_like(valid))
    loss.backward()
    assert loss.item() == 0.0 and not used.any() and torch.isneginf(log_marginal).all()
    assert (r.grad == 0).all() and (scores.grad == 0).all()


def test_span_log_softmax_normalises_over_valid_spans():
    scores = torch.randn(3, 7, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [0] * 7, [1] * 7], dtype=torch.bool)
    logp = span_log_softmax(scores, valid)
    assert torch.isneginf(logp[~valid]).all()
    torch.testing.assert_close(logp[0].exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(logp[2], torch.log_softmax(scores[2], dim=0))
    for i, j in itertools.combinations(valid[0].nonzero().flatten().tolist(), 2):
        assert logp[0, i] - logp[0, j] == pytest.approx(float(scores[0, i] - scores[0, j]), abs=1e-12)
