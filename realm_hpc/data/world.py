"""The embedded fact world: a deterministic corpus where knowing a masked fact requires retrieving it.

People, organisations and cities with years, numbers and places. Every fact is stated in exactly two documents
in different words: the subject's own page uses the full name, the second document (a page of a city's natives
or an organisation's staff) usually names the person by an alias ("M. Kessler"). After trivial-retrieval
exclusion the other document is the only gold one, so the reader can only know a held-out fact by retrieving it.

Why retrieval is worth learning here (and ICT alone does not saturate it):
- surnames are shared by ~a dozen people, first names by many, organisations are named after surnames, and all
  years and cities are values of the same type: a query matches many documents on name parts alone;
- the second document names the person by an alias. ICT pairs a sentence with its *own* block, so it never
  sees "Maria Kessler" beside "M. Kessler"; the MLM signal does (the block that completes the fact is the one
  with the matching alias), and that mapping generalises across people.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from realm_hpc.data.corpus import Doc

_SYLLABLES = ("var ost mer hal den bro kel tam sor vin lup dar fen gal hom ric tor wen ald bel cor dun "
              "esk fal gor hav ing jor kav lin mor nor pel quin ras sel tav ul vos wyn yar zel").split()
_FIRST_NAMES = ("Maria Mark Anna Adam Clara Carl Elena Emil Greta Georg Hanna Hugo Ida Ivan Julia Jonas Karla "
                "Kurt Lena Leon Nora Nils Olga Oskar Paula Peter Rosa Rolf Sara Simon Tilda Theo Vera Viktor "
                "Wanda Walter Edith Erik Lotte Lukas").split()
_ORG_KINDS = ("Instruments Mills Press Foundry Works Bank Shipping Brewery Chemicals Textiles Observatory "
              "Institute Railways Glassworks Tannery").split()
_OCCUPATIONS = ("chemist painter engineer surveyor botanist architect composer physician cartographer "
                "astronomer printer geologist").split()


@dataclass(frozen=True)
class Fact:
    id: int
    subject: str  # the subject's canonical name
    relation: str
    value: str


@dataclass
class Sentence:
    doc: int  # index of the document it stands in
    text: str
    start: int = 0  # character offset in the document's text
    facts: list[tuple[int, int, int]] = field(default_factory=list)  # (fact id, value start, value end)


@dataclass
class World:
    docs: list[Doc]
    sentences: list[Sentence]
    facts: list[Fact]
    heldout: set[int]  # fact ids never stated by a training target

    def fact_docs(self) -> dict[int, list[int]]:
        where: dict[int, list[int]] = {}
        for s in self.sentences:
            for fact_id, _, _ in s.facts:
                where.setdefault(fact_id, [])
                if s.doc not in where[fact_id]:
                    where[fact_id].append(s.doc)
        return where

    def training_sentences(self) -> list[Sentence]:
        # Two people can share an alias and a value, so another fact's sentence can read word for word like a
        # held-out statement: drop those too, or a closed-book reader could learn the held-out answer.
        stating = {s.text for s in self.sentences if any(f in self.heldout for f, _, _ in s.facts)}
        return [s for s in self.sentences
                if s.text not in stating and not any(f in self.heldout for f, _, _ in s.facts)]

    def eval_examples(self, limit: int | None, seed: int = 0) -> list["HeldOut"]:
        """One example per (held-out fact, stating sentence): the value span masked, the other doc(s) gold; the
        first `limit` of a seeded order (None: all)."""
        where = self.fact_docs()
        out = []
        for s in self.sentences:
            for fact_id, start, end in s.facts:
                if fact_id in self.heldout:
                    gold = [d for d in where[fact_id] if d != s.doc]
                    out.append(HeldOut(source_doc=s.doc, text=s.text, span=(start, end), gold_docs=gold,
                                       fact_id=fact_id))
        random.Random(seed).shuffle(out)
        return out[:limit]


@dataclass(frozen=True)
class HeldOut:
    source_doc: int
    text: str
    span: tuple[int, int]  # character span of the masked value in `text`
    gold_docs: list[int]
    fact_id: int


class _Writer:
    """Builds one document sentence by sentence, recording where each fact's value stands."""

    def __init__(self, world: "_Builder", title: str):
        self.world, self.title, self.sentences = world, title, []

    def say(self, template: str, fact: Fact | None = None, **names: str) -> None:
        # The value goes in through the {value} slot so its character span is known exactly.
        text = template.format(value="\x00", **names)
        facts = []
        if fact is not None:
            start = text.index("\x00")
            facts.append((fact.id, start, start + len(fact.value)))
        self.sentences.append(Sentence(doc=-1, text=text.replace("\x00", fact.value if fact else ""),
                                       facts=facts))

    def close(self) -> None:
        if not self.sentences:
            return
        doc_index, start = len(self.world.docs), 0
        for s in self.sentences:
            s.doc, s.start = doc_index, start
            start += len(s.text) + 1  # sentences are joined by one space
        self.world.sentences.extend(self.sentences)
        text = " ".join(s.text for s in self.sentences)
        self.world.docs.append(Doc(id=str(doc_index), title=self.title, text=text))


class _Builder:
    def __init__(self):
        self.docs: list[Doc] = []
        self.sentences: list[Sentence] = []
        self.facts: list[Fact] = []

    def fact(self, subject: str, relation: str, value: str) -> Fact:
        f = Fact(len(self.facts), subject, relation, value)
        self.facts.append(f)
        return f


def _unique_names(rng: random.Random, count: int, make) -> list[str]:
    seen: set[str] = set()
    out = []
    while len(out) < count:
        name = make()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


_TEMPLATES = {
    "born": ["{n} was born in {v}.", "{n} came into the world in {v}.", "The year {v} saw the birth of {n}.",
             "{n}, a {job}, was born in the year {v}."],
    "birthplace": ["{n} grew up in {v}.", "The birthplace of {n} is {v}.", "{n} came from the town of {v}.",
                   "{n} was a native of {v}."],
    "employer": ["{n} worked for {v}.", "{n} was employed by {v}.", "{n} joined {v} as a young {job}.",
                 "For many years {n} served at {v}."],
    "population": ["{n} is a town with a population of {v}.", "Around {v} people live in {n}.",
                   "{n} counts {v} inhabitants."],
    "founded": ["{n} was founded in {v}.", "{n} dates from {v}.", "{n} was established in {v}."],
    "seat": ["{n} has its seat in {v}.", "The offices of {n} stand in {v}.", "{n} is based in {v}."],
}
_FILLER = ["{n} was a {job}.", "{n} trained as a {job}.", "Colleagues remembered {n} as a careful {job}."]


def build_world(*, people: int = 1200, orgs: int = 240, cities: int = 80, surnames: int = 90,
                alias_rate: float = 0.8, heldout_facts: int = 300, seed: int = 0) -> World:
    """Every subject gets two pages that state all its facts, each fact in a different phrasing drawn from the
    same pool (so neither page has a style the other lacks). A person's second page names them by an alias with
    probability `alias_rate`."""
    rng = random.Random(seed)
    word = lambda n: "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()  # noqa: E731
    surname_pool = _unique_names(rng, surnames, lambda: word(2))
    city_names = _unique_names(rng, cities, lambda: word(rng.choice((2, 3))))
    person_names = _unique_names(rng, people, lambda: f"{rng.choice(_FIRST_NAMES)} {rng.choice(surname_pool)}")
    org_names = _unique_names(rng, orgs, lambda: f"{rng.choice(surname_pool)} {rng.choice(_ORG_KINDS)}")
    b = _Builder()

    def two_pages(titles: tuple[str, str], names: tuple[str, str], facts: list[Fact], job: str = "") -> None:
        pages = [[], []]
        for f in facts:
            first, second = rng.sample(_TEMPLATES[f.relation], 2)  # the two statements differ in wording
            pages[0].append((first, f))
            pages[1].append((second, f))
        if job:
            for page in pages:
                page.append((rng.choice(_FILLER), None))
        for title, name, page in zip(titles, names, pages):
            rng.shuffle(page)
            w = _Writer(b, title)
            for template, f in page:
                w.say(template.replace("{v}", "{value}").replace("{n}", "{name}"), f, name=name, job=job)
            w.close()

    for c in city_names:
        facts = [b.fact(c, "population", str(rng.randrange(20, 900) * 100)),
                 b.fact(c, "founded", str(rng.randrange(1100, 1700)))]
        two_pages((c, f"About {c}"), (c, c), facts)
    for o in org_names:
        facts = [b.fact(o, "founded", str(rng.randrange(1780, 1920))), b.fact(o, "seat", rng.choice(city_names))]
        two_pages((o, f"History of {o}"), (o, o), facts)
    for name in person_names:
        first, last = name.split(" ")
        alias = f"{first[0]}. {last}" if rng.random() < alias_rate else name
        facts = [b.fact(name, "born", str(rng.randrange(1800, 1960))),
                 b.fact(name, "birthplace", rng.choice(city_names)),
                 b.fact(name, "employer", rng.choice(org_names))]
        two_pages((name, alias), (name, alias), facts, job=rng.choice(_OCCUPATIONS))

    # Hold out whole person facts: neither of their two sentences is ever a training target.
    person_fact_ids = [f.id for f in b.facts if f.relation in ("born", "birthplace", "employer")]
    heldout = set(random.Random(seed + 1).sample(person_fact_ids, min(heldout_facts, len(person_fact_ids))))
    return World(docs=b.docs, sentences=b.sentences, facts=b.facts, heldout=heldout)
