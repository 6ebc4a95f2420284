"""The copy head's mixture log(g p_vocab + (1 - g) p_copy), computed in log space (models/reader.py)."""

import math

import torch
import torch.nn.functional as F

from realm_hpc.models.reader import copy_mixture_logp

N, T, L, V = 3, 2, 7, 11


def _old_formula(vocab_logp, attn, input_ids, doc_mask, gate_logit):
    """The mixture as it was computed before: in probability space, clamped at 1e-30."""
    has_doc = doc_mask.any(dim=1)
    attn = attn.float().masked_fill(~doc_mask.unsqueeze(1), float("-inf"))
    attn = torch.where(has_doc[:, None, None], attn, torch.zeros_like(attn))
    copy_p = torch.zeros_like(vocab_logp).scatter_add_(
        2, input_ids.unsqueeze(1).expand(-1, attn.size(1), -1), F.softmax(attn, dim=-1))
    gate = torch.sigmoid(gate_logit.float())
    gate = torch.where(has_doc[:, None, None], gate, torch.ones_like(gate))
    return torch.log((gate * vocab_logp.exp() + (1 - gate) * copy_p).clamp_min(1e-30))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab_logits = torch.randn(N, T, V, generator=g) * 2
    attn = torch.randn(N, T, L, generator=g) * 2
    input_ids = torch.randint(0, 5, (N, L), generator=g)  # tokens 0-4 repeat: copies of one token add up
    input_ids[0, 4:] = torch.tensor([1, 1, 7])
    doc_mask = torch.zeros(N, L, dtype=torch.bool)
    doc_mask[0, 3:] = True
    doc_mask[1, 2:6] = True  # row 2: the null document, nothing to copy
    gate_logit = torch.randn(N, T, 1, generator=g)
    return vocab_logits, attn, input_ids, doc_mask, gate_logit


def test_log_space_mixture_equals_the_old_formula_where_both_are_finite():
    vocab_logits, attn, input_ids, doc_mask, gate_logit = _inputs()
    vocab_logp = F.log_softmax(vocab_logits, dim=-1)
    new = copy_mixture_logp(vocab_logp, attn, input_ids, doc_mask, gate_logit)
    old = _old_formula(vocab_logp, attn, input_ids, doc_mask, gate_logit)
    assert torch.isfinite(old).all() and (old > math.log(1e-30) + 1).all()  # nothing here reaches the clamp
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.exp().sum(dim=-1), torch.ones(N, T))  # still a distribution over V
    assert torch.equal(new[2], vocab_logp[2])  # the null document: the vocabulary alone
    # Token 7 is copyable only from row 0's document, token 1 twice there: their copy mass adds up.
    p_copy0 = torch.softmax(attn[0].masked_fill(~doc_mask[0], float("-inf")), dim=-1)
    g0 = torch.sigmoid(gate_logit[0])
    for v in (1, 7):
        expected = g0[:, 0] * vocab_logp[0, :, v].exp() + (1 - g0[:, 0]) * p_copy0[:, input_ids[0] == v].sum(-1)
        torch.testing.assert_close(new[0, :, v].exp(), expected)


def test_log_space_mixture_stays_finite_and_exact_where_the_old_one_clamps():
    vocab_logits, attn, input_ids, doc_mask, gate_logit = _inputs(1)
    vocab_logits[:, :, 9] = -300.0  # token 9: never in a document, and ~e^-300 under the vocabulary softmax
    vocab_logits[0, :, 1] = -300.0  # token 1: as unlikely from the vocabulary, but copyable in row 0
    attn[1] = attn[1] - 40 * torch.arange(L)  # row 1: attention far from uniform
    vocab_logits.requires_grad_(True)
    attn.requires_grad_(True)
    gate_logit.requires_grad_(True)
    vocab_logp = F.log_softmax(vocab_logits, dim=-1)
    new = copy_mixture_logp(vocab_logp, attn, input_ids, doc_mask, gate_logit)
    old = _old_formula(vocab_logp, attn, input_ids, doc_mask, gate_logit)
    assert torch.isfinite(new).all()
    clamped = old <= math.log(1e-30) + 1e-3
    assert clamped[:, :, 9].all()  # the old formula clamped token 9 everywhere (log 1e-30 = -69.1)
    # float64 reference: with a document, log g + log p_vocab(9); without one, log p_vocab(9) itself.
    vocab64 = F.log_softmax(vocab_logits.detach().double(), dim=-1)
    log_g = torch.where(doc_mask.any(1)[:, None], F.logsigmoid(gate_logit.detach().double())[..., 0], 0)
    torch.testing.assert_close(new[:, :, 9].double(), log_g + vocab64[:, :, 9], atol=1e-4, rtol=1e-6)
    assert (new[:, :, 9] < -250).all()
    # Token 1 in row 0 comes from the copy side: log(1 - g) + log p_copy(1), not the vocabulary's e^-300.
    p_copy0 = torch.softmax(attn.detach()[0].double().masked_fill(~doc_mask[0], float("-inf")), dim=-1)
    copy1 = F.logsigmoid(-gate_logit.detach()[0, :, 0].double()) + p_copy0[:, input_ids[0] == 1].sum(-1).log()
    torch.testing.assert_close(new[0, :, 1].double(), copy1, atol=1e-5, rtol=1e-6)

    # The gradient of a loss that picks the vanishing tokens is finite everywhere (no 0 * inf from log 0).
    (new[:, :, 9].sum() + new[0, :, 1].sum() + new[1, :, 3].sum()).backward()
    for t in (vocab_logits, attn, gate_logit):
        assert torch.isfinite(t.grad).all()
    assert attn.grad[0].abs().sum() > 0 and gate_logit.grad[0].abs().sum() > 0
