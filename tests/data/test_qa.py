"""QA files (DPR .qa.csv, JSONL), answer normalisation, exact match, and questions from the fact world."""

import json
import re

import pytest

from realm_hpc.data.corpus import CorpusFormatError
from realm_hpc.data.qa import (QUESTION_TEMPLATES, QAExample, dpr_tokens, exact_match, has_answer, normalize_answer,
                               read_qa, world_questions, write_qa_jsonl)
from realm_hpc.data.world import build_world


@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  the   Beatles ", "beatles"),
    ("An apple, a day!", "apple day"),
    ("M. Kessler", "m kessler"),
    ("U.S.A.", "usa"),
    ("Theodore", "theodore"),  # articles only as whole words
    ("then a thematic", "then thematic"),
    ("1,200", "1200"),
    ("A", ""),
    ("Rock-'n'-Roll", "rocknroll"),
    ("Ärzte ohne Grenzen", "ärzte ohne grenzen"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_any_gold():
    assert exact_match("the Kavbrovos.", ["Paris", "kavbrovos"])
    assert exact_match("m. kessler", ["M. Kessler"])
    assert not exact_match("Kavbrovos town", ["Kavbrovos"])
    assert not exact_match("", ["Kavbrovos"])


# Lead sentences of English Wikipedia articles (CC BY-SA), with answers of every kind DPR's rule must see.
GODEL = ("Kurt Friedrich Gödel (April 28, 1906 – January 14, 1978) was a logician, mathematician, and philosopher. "
         "He was born in Brünn, Austria-Hungary (now Brno, Czech Republic).")
APPLE = ("Apple Inc. is an American multinational technology company headquartered in Cupertino, California. "
         "It had about 1,000 employees in 1980 and its first product sold for US$666.66.")
SARTRE = "Jean-Paul Charles Aymard Sartre was a French philosopher, born in Paris; he lived in the U.S. briefly."


@pytest.mark.parametrize("text, answer, expected", [
    (GODEL, "Gödel", True),
    (GODEL, "godel", False),  # DPR's rule keeps accents (NFD + combining marks stay in the token)
    (GODEL, "Brünn, Austria-Hungary", True),
    (GODEL, "April 28, 1906", True),
    (GODEL, "Brno", True),
    (GODEL, "Czech", True),
    (GODEL, "Czech Republic.", False),  # "Republic)." : the period is not next to the answer's last word
    (APPLE, "Cupertino, California", True),
    (APPLE, "1,000", True),
    (APPLE, "1000", False),  # punctuation marks are tokens: "1,000" is three
    (APPLE, "666.66", True),
    (APPLE, "Apple Inc.", True),
    (APPLE, "apple inc", True),  # uncased
    (SARTRE, "Jean-Paul", True),
    (SARTRE, "Jean Paul", False),
    (SARTRE, "U.S.", True),
    (SARTRE, "Paris", True),
    (SARTRE, "Pari", False),  # whole tokens only
])
def test_has_answer_dpr_rule(text, answer, expected):
    assert has_answer(text, [answer]) is expected


def test_has_answer_any_of_several_and_empty():
    assert has_answer(APPLE, ["Palo Alto", "Cupertino"])
    assert not has_answer(APPLE, ["Palo Alto"])
    assert not has_answer(APPLE, ["", "  "])  # an empty answer never matches


def test_dpr_tokens_split_punctuation_keep_accents():
    assert dpr_tokens("Brünn, Austria-Hungary (now Brno)") == [
        "bru\u0308nn", ",", "austria", "-", "hungary", "(", "now", "brno", ")"]


def test_read_dpr_csv(tmp_path):
    path = tmp_path / "nq-dev.qa.csv"
    path.write_text("who wrote the tin drum\t['Günter Grass']\n"
                    "when was x born\t[\"1890\", 'in 1890']\n"
                    "\n"  # blank lines are skipped
                    "a question with a\ttab inside\t['yes']\n", encoding="utf-8")
    examples = read_qa(path)
    assert examples == [QAExample("who wrote the tin drum", ("Günter Grass",)),
                        QAExample("when was x born", ("1890", "in 1890")),
                        QAExample("a question with a\ttab inside", ("yes",))]


def test_read_jsonl_and_round_trip(tmp_path):
    original = [QAExample("Where did Ida Havbel grow up?", ("Kavbrovos",), 7), QAExample("q2", ("x", "y"))]
    path = write_qa_jsonl(original, tmp_path / "x.jsonl")
    assert read_qa(path) == original
    (tmp_path / "y.jsonl").write_text(json.dumps({"question": "q", "answers": ["x"]}) + "\n")
    assert read_qa(tmp_path / "y.jsonl") == [QAExample("q", ("x",))]


@pytest.mark.parametrize("name, content, line, reason", [
    ("a.qa.csv", "ok\t['x']\nno tab here\n", 2, "expected question<TAB>"),
    ("a.qa.csv", "ok\t['x']\n\nq\t['x', \n", 3, "Python-literal list"),
    ("a.qa.csv", "q\t'just a string'\n", 1, "non-empty list of strings"),
    ("a.qa.csv", "q\t[]\n", 1, "non-empty list of strings"),
    ("a.qa.csv", "q\t[1890]\n", 1, "non-empty list of strings"),
    ("a.qa.csv", "q\t['the', '.']\n", 1, "empty after normalisation"),
    ("a.qa.csv", "\t['x']\n", 1, "empty question"),
    ("a.qa.csv", "q\t__import__('os')\n", 1, "Python-literal list"),
    ("b.jsonl", '{"question": "q", "answers": ["x"]}\n{"question": "q"\n', 2, "invalid JSON"),
    ("b.jsonl", '{"question": "q", "answers": ["x"]}\n["q", ["x"]]\n', 2, "expected {"),
    ("b.jsonl", '{"question": "q", "answers": "a"}\n', 1, "non-empty list of strings"),
])
def test_malformed_lines_name_file_and_line(tmp_path, name, content, line, reason):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusFormatError) as err:
        read_qa(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert reason in message and "\n" not in message


def test_unknown_format_missing_and_empty(tmp_path):
    (tmp_path / "q.txt").write_text("q\t['x']\n")
    with pytest.raises(ValueError, match="unknown QA format"):
        read_qa(tmp_path / "q.txt")
    with pytest.raises(FileNotFoundError, match="no such QA file"):
        read_qa(tmp_path / "missing.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        read_qa(tmp_path / "e.jsonl")


def test_world_questions_split_by_fact():
    world = build_world(people=60, orgs=12, cities=8, surnames=10, heldout_facts=10, seed=3)
    splits = world_questions(world, dev_fraction=0.1, test_fraction=0.2, seed=1, phrasings_per_fact=2)
    facts = {s: {e.fact_id for e in v} for s, v in splits.items()}
    assert not (facts["train"] & facts["dev"]) and not (facts["train"] & facts["test"])
    assert not (facts["dev"] & facts["test"])
    assert facts["train"] | facts["dev"] | facts["test"] == {f.id for f in world.facts}
    assert len(facts["dev"]) == int(0.1 * len(world.facts)) and len(facts["test"]) == int(0.2 * len(world.facts))
    by_id = {f.id: f for f in world.facts}
    for examples in splits.values():
        for e in examples:
            f = by_id[e.fact_id]
            assert e.answers == (f.value,)
            # The question is one of its relation's phrasings about its subject.
            assert any(e.question == t.format(s=f.subject) for t in QUESTION_TEMPLATES[f.relation])
    # Two distinct phrasings per fact.
    per_fact = {}
    for e in splits["train"]:
        per_fact.setdefault(e.fact_id, set()).add(e.question)
    assert all(len(q) == 2 for q in per_fact.values())
    assert splits == world_questions(world, 0.1, 0.2, seed=1, phrasings_per_fact=2)  # deterministic
    assert set(QUESTION_TEMPLATES) == {f.relation for f in world.facts}
    assert all(re.search(r"\?$", t) for ts in QUESTION_TEMPLATES.values() for t in ts)
