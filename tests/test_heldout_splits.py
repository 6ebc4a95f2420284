"""Held-out dev and test splits: disjoint by world fact or corpus article, and a run reads test only at its start and
its end (every choice it makes, ICT's early stopping included, reads dev)."""

import json

import pytest

from realm_hpc.config import ConfigError, apply_overrides
from realm_hpc.data.examples import PretrainData, _load_docs
from realm_hpc.data.world import build_world
from realm_hpc.recipes import get_recipe


def _world(cfg):
    d = cfg.data
    return build_world(people=d.world_people, orgs=d.world_orgs, cities=d.world_cities, surnames=d.world_surnames,
                       alias_rate=d.world_alias_rate, heldout_facts=d.heldout_facts, seed=d.world_seed)


def test_world_splits_share_no_fact_and_test_is_the_seeded_first_examples():
    cfg = get_recipe("tiny")
    _, _, raw, _ = _load_docs(cfg)
    dev, test = raw["dev"], raw["test"]
    assert len(test) == cfg.data.eval_examples and 0 < len(dev) <= cfg.data.dev_examples
    world = _world(cfg)
    order = world.eval_examples(None, seed=cfg.data.world_seed)
    fact_of = {(e.text, e.span, e.source_doc): e.fact_id for e in order}
    dev_facts = {fact_of[text, span, source] for text, span, source, _ in dev}
    test_facts = {fact_of[text, span, source] for text, span, source, _ in test}
    assert not dev_facts & test_facts
    # Test is exactly the first eval_examples of the world's seeded order: what runs reported before the split.
    assert [(t, s, src) for t, s, src, _ in test] == [(e.text, e.span, e.source_doc)
                                                      for e in order[:cfg.data.eval_examples]]


def test_corpus_splits_share_no_source_article(tmp_path):
    from realm_hpc.data.corpus import Doc, write_jsonl

    # A made-up corpus of Wikipedia-like leads: each article names two others by title, so held-out sentences get
    # gold documents.
    names = [f"Port {c}{d}" for c in "ABCDEFGHIJ" for d in "klmnopqrst"]
    docs = [Doc(str(i), name, f"{name} is a harbour town founded in {1500 + i}. It trades with {names[(i + 1) % 100]}. "
                              f"Its sister city is {names[(i + 7) % 100]}, across the bay.")
            for i, name in enumerate(names)]
    corpus = write_jsonl(docs, tmp_path / "corpus.jsonl")
    cfg = apply_overrides(get_recipe("tiny"), [f"data.corpus={corpus}", "data.eval_examples=8", "data.dev_examples=6"])
    data = PretrainData(cfg, tmp_path / "run")
    dev, test = data.heldout("dev"), data.heldout("test")
    assert len(test) == 8 and 0 < len(dev) <= 6  # 300 sentences, each held out with p = 0.05
    assert not {e.source for e in dev} & {e.source for e in test}
    held = {(e.source, data.tokenizer.decode(e.sentence.ids)) for e in dev + test}
    trained = {(int(d), data.tokenizer.decode(t.ids)) for d, t in zip(data.train.doc, data.train.tokens)}
    assert not held & trained  # a held-out sentence is never a training query


def test_unknown_split_and_no_dev_left_are_one_line_errors(tmp_path):
    data = PretrainData(get_recipe("tiny"), tmp_path / "a")
    with pytest.raises(ValueError, match="unknown held-out split 'eval'"):
        data.heldout("eval")
    # 10 held-out facts, 20 examples: a test of 20 leaves no fact for dev.
    cfg = apply_overrides(get_recipe("tiny"), ["data.heldout_facts=10", "data.eval_examples=20"])
    with pytest.raises(ConfigError, match="data.dev_examples=300: no held-out example is left for dev"):
        PretrainData(cfg, tmp_path / "b")
    assert PretrainData(apply_overrides(cfg, ["data.dev_examples=0"]), tmp_path / "c").heldout("dev") == []


def test_a_run_reads_test_at_its_start_and_end_only(small_world, tmp_path, monkeypatch):
    """Every read of a held-out split goes through PretrainData.heldout: record them beside the training batches
    and the start of finish(). Test is read before the first training batch (the start index) and after finish
    begins; ICT's early stopping and the REALM loop's evaluations read dev."""
    from realm_hpc import train
    from realm_hpc.cli import main

    events = []
    for name in ("ict_batch", "train_batch"):
        real = getattr(PretrainData, name)
        monkeypatch.setattr(PretrainData, name, lambda self, *a, _real=real, _n=name, **kw:
                            events.append(_n) or _real(self, *a, **kw))
    real_heldout = PretrainData.heldout
    monkeypatch.setattr(PretrainData, "heldout", lambda self, split: events.append(split) or real_heldout(self, split))
    real_finish = train.Pretrainer.finish
    monkeypatch.setattr(train.Pretrainer, "finish", lambda self, live: events.append("finish") or
                        real_finish(self, live))
    sets = small_world + ["ict.steps=20", "ict.eval_every=5", "ict.patience=100", "train.reader_warmup_steps=2",
                          "train.eval_every=2", "refresh.every=3", "train.checkpoint_every=1000",
                          "eval.closed_book_baseline=true"]
    out = tmp_path / "run"
    main(["pretrain", "--recipe", "tiny", "--out", str(out), "--steps", "6", *[x for s in sets for x in ("--set", s)]])

    first_batch, finish = events.index("ict_batch"), events.index("finish")
    test_reads = [i for i, e in enumerate(events) if e == "test"]
    assert test_reads and all(i < first_batch or i > finish for i in test_reads), events
    assert any(i < first_batch for i in test_reads) and any(i > finish for i in test_reads)
    # Dev is read between ICT batches (its 4 evaluations, the early stopping's) and between REALM batches (steps 2, 4).
    realm_first = events.index("train_batch")
    assert sum(1 for i, e in enumerate(events[first_batch:realm_first]) if e == "dev") >= 4
    assert "dev" in events[realm_first:finish]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_examples"] == len(real_heldout(PretrainData(apply_overrides(get_recipe("tiny"), sets), out,
                                                                     build=False), "test"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mid_run = [r for r in rows if 0 < r["step"] < summary["ict_steps"] + summary["steps"]]
    assert any("dev_recall_at_k" in r for r in mid_run) and not any(
        key.startswith("test_") for r in mid_run for key in r), mid_run

