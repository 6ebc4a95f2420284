import re
from collections import Counter

import pytest

from realm_hpc.data.examples import split_sentences
from realm_hpc.data.world import build_world

SIZES = dict(people=120, orgs=24, cities=12, surnames=15, heldout_facts=40)


@pytest.fixture(scope="module")
def world():
    return build_world(**SIZES, alias_rate=0.8, seed=3)


def test_build_world_is_deterministic_for_a_seed(world):
    again = build_world(**SIZES, alias_rate=0.8, seed=3)
    assert again.docs == world.docs
    assert again.facts == world.facts
    assert again.heldout == world.heldout
    assert [(s.doc, s.text, s.start, s.facts) for s in again.sentences] == \
           [(s.doc, s.text, s.start, s.facts) for s in world.sentences]
    assert again.eval_examples(30, seed=3) == world.eval_examples(30, seed=3)
    other = build_world(**SIZES, alias_rate=0.8, seed=4)
    assert [d.text for d in other.docs] != [d.text for d in world.docs]


def test_world_shape(world):
    # Two pages per subject; three facts per person, two per city and per organisation.
    assert len(world.docs) == 2 * (SIZES["people"] + SIZES["orgs"] + SIZES["cities"])
    assert len(world.facts) == 3 * SIZES["people"] + 2 * (SIZES["orgs"] + SIZES["cities"])
    assert [d.id for d in world.docs] == [str(i) for i in range(len(world.docs))]
    assert len(world.heldout) == SIZES["heldout_facts"]
    person_relations = {"born", "birthplace", "employer"}
    assert all(world.facts[f].relation in person_relations for f in world.heldout)
    # Aliases ("M. Kessler") are there: the point of the second page.
    assert any(re.fullmatch(r"[A-Z]\. \w+", d.title) for d in world.docs)


def test_sentences_and_fact_spans_point_into_the_documents(world):
    for s in world.sentences:
        doc = world.docs[s.doc]
        assert doc.text[s.start:s.start + len(s.text)] == s.text
        for fact_id, a, b in s.facts:
            assert s.text[a:b] == world.facts[fact_id].value


def test_every_fact_is_stated_in_at_least_two_documents(world):
    where = world.fact_docs()
    assert set(where) == {f.id for f in world.facts}
    counts = Counter(len(docs) for docs in where.values())
    assert min(counts) >= 2, counts
    for fact_id, docs in where.items():
        assert len(set(docs)) == len(docs)
        value = world.facts[fact_id].value
        assert all(value in world.docs[d].text for d in docs)


def test_no_training_sentence_states_a_heldout_fact(world):
    train = world.training_sentences()
    assert 0 < len(train) < len(world.sentences)
    assert not any(f in world.heldout for s in train for f, _, _ in s.facts)
    stating = [s for s in world.sentences if any(f in world.heldout for f, _, _ in s.facts)]
    assert len(stating) >= 2 * len(world.heldout)  # both statements of every held-out fact are gone
    stating_text = {s.text for s in stating}
    dropped = [s for s in world.sentences if s not in train]
    assert all(s in stating or s.text in stating_text for s in dropped)


def _recipe_world(name):
    from realm_hpc.recipes import get_recipe

    d = get_recipe(name).data
    return build_world(people=d.world_people, orgs=d.world_orgs, cities=d.world_cities, surnames=d.world_surnames,
                       alias_rate=d.world_alias_rate, heldout_facts=d.heldout_facts, seed=d.world_seed)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: _recipe_world("tiny"), id="tiny"),
    # Two people can share an alias and a value: one's training sentence is then word for word the held-out
    # statement of the other's fact ("The birthplace of K. Fenmor is Dunost." with seed 3).
    pytest.param(lambda: _recipe_world("demo"), id="demo"),
    pytest.param(lambda: build_world(**SIZES, alias_rate=0.8, seed=3), id="alias-collision"),
])
def test_no_training_sentence_repeats_a_heldout_statement(make):
    world = make()
    stating = {s.text for s in world.sentences if any(f in world.heldout for f, _, _ in s.facts)}
    leaked = stating & {s.text for s in world.training_sentences()}
    assert not leaked


def test_eval_examples(world):
    examples = world.eval_examples(10_000, seed=0)
    assert {e.fact_id for e in examples} == world.heldout
    for e in examples:
        value = e.text[e.span[0]:e.span[1]]
        assert value == world.facts[e.fact_id].value
        assert e.text in world.docs[e.source_doc].text
        assert e.gold_docs and e.source_doc not in e.gold_docs
        for g in e.gold_docs:
            assert value in world.docs[g].text
            assert any(s.doc == g and any(f == e.fact_id for f, _, _ in s.facts) for s in world.sentences)
    assert world.eval_examples(7, seed=0) == examples[:7]


def test_split_sentences_recovers_the_world_sentences():
    world = build_world(**SIZES, alias_rate=1.0, seed=5)
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for s in world.sentences:
        by_doc.setdefault(s.doc, []).append((s.start, s.start + len(s.text)))
    initials = 0
    for i, doc in enumerate(world.docs):
        assert split_sentences(doc.text) == by_doc[i], doc.text
        initials += bool(re.search(r"\b[A-Z]\. [A-Z]", doc.text))
    assert initials >= SIZES["people"]  # every person's second page names them by an initial


@pytest.mark.parametrize("text, expected", [
    ("M. Kessler was born in 1890. She worked for Kessler Mills.",
     ["M. Kessler was born in 1890.", "She worked for Kessler Mills."]),
    ("The birth of M. Kessler came in 1890. Around 12300 people live in Varost! Why? 1890 was a year.",
     ["The birth of M. Kessler came in 1890.", "Around 12300 people live in Varost!", "Why?", "1890 was a year."]),
    ("One sentence without a full stop", ["One sentence without a full stop"]),
    ("", []),
])
def test_split_sentences_cases(text, expected):
    assert [text[a:b] for a, b in split_sentences(text)] == expected
