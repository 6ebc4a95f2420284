import numpy as np
import pytest

from realm_hpc.data.masking import (TokenizedSentence, char_to_token_span, mask_sentence, salient_spans,
                                    tokenize_sentences)

MASK = 4


def spans_text(text: str) -> list[str]:
    return [text[a:b] for a, b in salient_spans(text)]


@pytest.mark.parametrize("text, expected", [
    ("Maria Kessler was born in 1890.", ["Maria Kessler", "1890"]),
    # An initial is part of the name, also when it opens the sentence.
    ("M. Kessler worked for Kessler Mills.", ["M. Kessler", "Kessler Mills"]),
    ("Colleagues remembered A. Kessler as a careful chemist.", ["A. Kessler"]),
    # Numbers with thousands separators and decimals are one span each.
    ("Around 12,300 people live in Varost.", ["12,300", "Varost"]),
    ("The town counts 1,234,567 inhabitants and 3.5 mills.", ["1,234,567", "3.5"]),
    # Dates are one span, not a number + a name + a year.
    ("She died on 12 March 1890 in Varost.", ["12 March 1890", "Varost"]),
    ("She was born on March 12, 1843 in Bonn.", ["March 12, 1843", "Bonn"]),
    ("On 3 May 1901 Kessler Mills opened.", ["3 May 1901", "Kessler Mills"]),
    # A lone capitalised word opening the sentence is capitalised by position: skipped.
    ("Kessler was a chemist.", []),
    ("Colleagues remembered the chemist.", []),
    ("The year 1890 saw the birth of Maria Kessler.", ["1890", "Maria Kessler"]),
    # A leading article is not part of the name.
    ("The Kessler Mills were founded in 1850.", ["Kessler Mills", "1850"]),
    ("A painter lived in Varost.", ["Varost"]),
    # Lower-case particles join a name only between capitalised words.
    ("He worked at the Bank of Varost.", ["Bank of Varost"]),
    ("Ludwig van Beethoven was born in Bonn.", ["Ludwig van Beethoven", "Bonn"]),
    ("the cat sat on the mat.", []),
])
def test_salient_spans(text, expected):
    assert spans_text(text) == expected


def test_salient_spans_are_ordered_and_disjoint():
    text = "M. Kessler met Maria Kessler at Kessler Mills in Varost on 12 March 1890 with 12,300 others."
    spans = salient_spans(text)
    assert spans_text(text) == ["M. Kessler", "Maria Kessler", "Kessler Mills", "Varost", "12 March 1890", "12,300"]
    assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))


def test_char_to_token_span():
    # "Maria Kessler was born" as tokens: maria | kess | ##ler | was | born
    offsets = np.array([[0, 5], [6, 10], [10, 13], [14, 17], [18, 22]])
    assert char_to_token_span(offsets, 0, 13) == (0, 3)
    assert char_to_token_span(offsets, 6, 13) == (1, 3)
    assert char_to_token_span(offsets, 7, 8) == (1, 2)  # partial overlap still takes the token
    assert char_to_token_span(offsets, 18, 22) == (4, 5)
    assert char_to_token_span(offsets, 13, 14) is None  # only the space between tokens
    assert char_to_token_span(offsets, 30, 40) is None


def _sentence(n=10, spans=()):
    ids = np.arange(100, 100 + n, dtype=np.int32)
    offsets = np.stack([np.arange(n) * 3, np.arange(n) * 3 + 2], axis=1)
    return TokenizedSentence(ids, offsets, list(spans))


def test_mask_sentence_with_a_given_span_masks_exactly_it():
    sent = _sentence(10, spans=[(0, 1), (7, 9)])
    before = sent.ids.copy()
    ids, positions, targets = mask_sentence(sent, MASK, np.random.default_rng(0), span=(3, 6))
    assert positions.tolist() == [3, 4, 5]
    assert targets.tolist() == [103, 104, 105]
    assert ids.tolist() == [100, 101, 102, MASK, MASK, MASK, 106, 107, 108, 109]
    assert np.array_equal(sent.ids, before)  # the stored sentence is never modified


def test_mask_sentence_picks_one_of_the_salient_spans():
    spans = [(1, 3), (6, 7)]
    sent = _sentence(10, spans=spans)
    seen = set()
    for seed in range(20):
        ids, positions, targets = mask_sentence(sent, MASK, np.random.default_rng(seed))
        span = (int(positions[0]), int(positions[-1]) + 1)
        assert span in spans and positions.tolist() == list(range(*span))
        assert np.array_equal(targets, sent.ids[positions])
        assert (ids == MASK).sum() == len(positions)
        seen.add(span)
    assert seen == set(spans)


def test_mask_sentence_skips_spans_that_are_too_long_or_the_whole_sentence():
    sent = _sentence(10, spans=[(0, 10), (1, 9), (4, 5)])
    for seed in range(10):
        _, positions, _ = mask_sentence(sent, MASK, np.random.default_rng(seed), max_span_tokens=5)
        assert positions.tolist() == [4]


def test_mask_sentence_falls_back_to_random_tokens():
    sent = _sentence(20, spans=[])
    ids, positions, targets = mask_sentence(sent, MASK, np.random.default_rng(0), random_rate=0.15)
    assert len(positions) == 3  # round(0.15 * 20)
    assert len(set(positions.tolist())) == 3 and positions.tolist() == sorted(positions.tolist())
    assert np.array_equal(targets, sent.ids[positions])
    assert np.flatnonzero(ids == MASK).tolist() == positions.tolist()
    # Deterministic for a seed: a resumed run masks the same tokens.
    again = mask_sentence(sent, MASK, np.random.default_rng(0), random_rate=0.15)
    assert np.array_equal(again[1], positions)
    # At least one token, even in a one-token sentence.
    _, positions, _ = mask_sentence(_sentence(1), MASK, np.random.default_rng(0))
    assert positions.tolist() == [0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from realm_hpc.data.tokenizer import train_wordpiece

    texts = ["Maria Kessler was born in 1890.", "M. Kessler worked for Kessler Mills.",
             "Around 12,300 people live in Varost.", "She died on 12 March 1890 in Varost."] * 5
    return train_wordpiece(texts, 200, tmp_path_factory.mktemp("tok"))


def test_tokenize_sentences_maps_salient_spans_to_tokens(tokenizer):
    texts = ["M. Kessler worked for Kessler Mills.", "Around 12,300 people live in Varost.",
             "the cat sat on the mat."]
    out = tokenize_sentences(tokenizer, texts, max_len=64)
    for text, sent in zip(texts, out):
        assert len(sent.ids) == len(sent.offsets)
        recovered = []
        for a, b in sent.spans:
            recovered.append(text[sent.offsets[a, 0]:sent.offsets[b - 1, 1]])
        assert recovered == spans_text(text)
    assert out[2].spans == []
    # Masking a mapped span removes exactly the entity's tokens.
    ids, positions, targets = mask_sentence(out[0], tokenizer.mask_token_id, np.random.default_rng(0),
                                            span=out[0].spans[1])
    assert tokenizer.decode(targets.tolist()).replace(" ", "") == "kesslermills"
