"""Open-QA end to end: a tiny pretraining, `realm-hpc finetune --recipe qa-tiny` on questions generated from its
fact world, `realm-hpc evaluate --qa` on a DPR .qa.csv, the closed-book baseline beside it, and resume.

Timing (2 cores shared, OMP_NUM_THREADS=1): pretrain ~15 s, fine-tune (100 steps + closed-book) ~35 s,
resume ~10 s. The fixtures print their wall time.
"""

import json
import signal
import time

import pytest
import torch

from realm_hpc import preempt
from realm_hpc.checkpoint import load_checkpoint
from realm_hpc.cli import main
from realm_hpc.data.qa import exact_match, normalize_answer, read_qa
from realm_hpc.metrics import read_metrics

PRETRAIN = ["pretrain", "--recipe", "tiny", "--steps", "12", "--set", "refresh.every=5",
            "--set", "train.reader_warmup_steps=4", "--set", "train.eval_every=1000",
            "--set", "train.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa") / "pretrain"
    t0 = time.perf_counter()
    main([*PRETRAIN, "--out", str(out)])
    print(f"\ntiny pretrain: {time.perf_counter() - t0:.1f} s")
    return out


# What the `finetuned` run scored, in call order, beside the end of its open-book and closed-book training.
EVENTS: list[tuple[str, tuple[str, ...]]] = []


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    from realm_hpc import finetune

    out = tmp_path_factory.mktemp("qa") / "ft"
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("evaluate_open_book", "evaluate_closed_book"):
            real = getattr(finetune, name)
            mp.setattr(finetune, name, lambda model, ctx, examples, *a, _real=real, _n=name, **kw: EVENTS.append(
                (_n, tuple(e.question for e in examples))) or _real(model, ctx, examples, *a, **kw))
        for name in ("train", "train_closed_book"):
            real = getattr(finetune.Finetuner, name)
            mp.setattr(finetune.Finetuner, name, lambda self, *a, _real=real, _n=name, **kw:
                       (_real(self, *a, **kw), EVENTS.append((f"{_n} done", ())))[0])
        main(["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    print(f"\nqa-tiny fine-tune: {time.perf_counter() - t0:.1f} s; dev EM {summary['dev_em']:.3f} "
          f"(closed-book {summary['dev_em_closed_book']:.3f}), recall@5 {summary['dev_recall_at_5']:.3f}")
    return out, summary


def test_dev_em_rises_above_the_closed_book_baseline(finetuned):
    out, summary = finetuned
    assert summary["dev_em"] >= summary["dev_em_closed_book"] + 0.05, summary
    assert summary["test_em"] > summary["test_em_closed_book"], summary
    assert summary["dev_recall_at_5"] > 0.5, summary
    evals = [r for r in read_metrics(out) if "dev_em" in r]
    assert [r["step"] for r in evals] == [50, 100]
    assert evals[-1]["dev_em"] > evals[0]["dev_em"], evals  # EM rises with fine-tuning
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0]


def test_test_questions_are_scored_after_training_only(finetuned):
    """Nothing the fine-tune decides can see test: dev is scored along the way, test once per model, after that
    model's training is over."""
    out, _ = finetuned
    test = tuple(e.question for e in read_qa(out / "qa" / "test.jsonl"))
    dev = tuple(e.question for e in read_qa(out / "qa" / "dev.jsonl"))
    names = [name for name, _ in EVENTS]
    trained, cb_trained = names.index("train done"), names.index("train_closed_book done")
    on_test = [(i, name) for i, (name, questions) in enumerate(EVENTS) if set(questions) & set(test)]
    assert [name for _, name in on_test] == ["evaluate_open_book", "evaluate_closed_book"], names
    assert trained < on_test[0][0] and cb_trained < on_test[1][0]
    assert all(EVENTS[i][1] == test for i, _ in on_test)
    # Dev, by contrast, is scored during training (steps 50 and 100 of qa-tiny), then at the end.
    assert sum(1 for name, questions in EVENTS[:trained] if set(questions) <= set(dev)) == 2


def test_generated_questions_and_predictions(finetuned):
    out, summary = finetuned
    splits = {s: read_qa(out / "qa" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    facts = {s: {e.fact_id for e in v} for s, v in splits.items()}
    assert not facts["train"] & facts["dev"] and not facts["train"] & facts["test"] and not facts["dev"] & facts["test"]
    assert summary["dev_questions"] == len(splits["dev"]) and summary["train_questions"] == len(splits["train"])
    for name, key in (("dev.predictions", "dev_em"), ("dev.closed_book.predictions", "dev_em_closed_book")):
        rows = [json.loads(line) for line in (out / "eval" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["question"] for r in rows] == [e.question for e in splits["dev"]]
        assert all(r["em"] == exact_match(r["prediction"], r["answers"]) for r in rows)
        assert sum(r["em"] for r in rows) / len(rows) == pytest.approx(summary[key])
    rows = [json.loads(line) for line in (out / "eval" / "dev.predictions.jsonl").read_text().splitlines()]
    assert all(len(r["doc_ids"]) == 5 and r["retrieval_scores"] == sorted(r["retrieval_scores"], reverse=True)
               for r in rows)
    assert sum(r["answer_in_top_k"] for r in rows) / len(rows) == pytest.approx(summary["dev_recall_at_5"])


def test_candidate_spans_cover_the_answer_on_the_subject_page(pretrained, finetuned):
    """The subject's own page states every fact about it: its candidate spans must contain the answer, and every
    candidate's normalised text must be that of the passage characters it covers (span_text)."""
    from realm_hpc.runs import load_run
    from realm_hpc.data.qa_inputs import QAInputs

    out, _ = finetuned
    cfg, data, _ = load_run(str(pretrained))
    inputs = QAInputs(data.tokenizer, data.blocks, cfg.model.reader_len, cfg.model.query_len, max_span_len=5)
    page = {data.blocks.title(i): i for i in range(len(data.blocks))}
    questions = read_qa(out / "qa" / "dev.jsonl")[:40]
    for e in questions:
        subject = max((t for t in page if t in e.question), key=len)  # the subject's name is its page's title
        assert inputs.contains_answer(page[subject], {normalize_answer(a) for a in e.answers}), (e, subject)
    assert len(questions) == 40
    spans = inputs.block_spans(page[subject])
    assert len(spans.norm) > 0 and ((spans.ends - spans.starts) < 5).all() and (spans.ends >= spans.starts).all()
    for a, z, norm in zip(spans.starts, spans.ends, spans.norm):
        assert normalize_answer(inputs.span_text(page[subject], int(a), int(z))) == norm


def test_evaluate_qa_on_a_dpr_csv(finetuned, tmp_path, capsys):
    out, summary = finetuned
    dev = read_qa(out / "qa" / "dev.jsonl")
    csv = tmp_path / "world-dev.qa.csv"
    csv.write_text("".join(f"{e.question}\t{list(e.answers)!r}\n" for e in dev), encoding="utf-8")
    main(["evaluate", "--qa", str(csv), "--run", str(out)])
    result = json.loads((out / "eval" / "world-dev.json").read_text())
    assert result["questions"] == len(dev)
    assert result["em"] == pytest.approx(summary["dev_em"]) and result["em_closed_book"] == pytest.approx(
        summary["dev_em_closed_book"])
    assert result["recall_at_5"] == pytest.approx(summary["dev_recall_at_5"])
    assert (out / "eval" / "world-dev.predictions.jsonl").is_file()
    assert (out / "eval" / "world-dev.closed_book.predictions.jsonl").is_file()
    assert "em_closed_book" in capsys.readouterr().out


def test_resume_gives_the_same_losses_and_weights(pretrained, tmp_path, monkeypatch, capsys):
    """Run b is preempted (SIGUSR1 seen after step 3, as Slurm's warning signal sets it): it checkpoints there,
    exits EXIT_PREEMPTED, and --resume finishes with the uninterrupted run's losses and weights."""
    common = ["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--set", "qa.log_every=1",
              "--set", "qa.checkpoint_every=1000", "--set", "qa.eval_every=1000",
              "--set", "qa.closed_book_baseline=false", "--set", "qa.dev_fraction=0.02", "--set", "qa.test_fraction=0.02",
              "--set", "qa.steps=6"]
    a, b = tmp_path / "a", tmp_path / "b"
    main([*common, "--out", str(a)])
    polls = iter(range(1, 100))
    monkeypatch.setattr(preempt, "requested", lambda: signal.SIGUSR1 if next(polls) >= 3 else None)
    with pytest.raises(SystemExit) as stopped:
        main([*common, "--out", str(b)])
    assert stopped.value.code == preempt.EXIT_PREEMPTED
    assert "preempted by SIGUSR1 at step 3: checkpoint written" in capsys.readouterr().err
    assert load_checkpoint(b / "checkpoint")["step"] == 3
    monkeypatch.undo()
    main(["finetune", "--out", str(b), "--resume"])
    losses = lambda run: {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}  # noqa: E731
    assert list(losses(b)) == [1, 2, 3, 4, 5, 6]
    assert losses(a) == pytest.approx(losses(b), abs=1e-6)
    wa, wb = load_checkpoint(a / "checkpoint")["model"], load_checkpoint(b / "checkpoint")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_finetune_cli_errors(pretrained, tmp_path, capsys):
    cases = [
        (["finetune", "--out", str(tmp_path / "x")], "--pretrained"),
        (["finetune", "--recipe", "tiny", "--pretrained", str(pretrained), "--out", str(tmp_path / "x")],
         "unknown recipe 'tiny'"),
        (["finetune", "--recipe", "qa-tiny", "--pretrained", str(tmp_path), "--out", str(tmp_path / "x")],
         "not a run directory"),
        (["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(tmp_path / "x"),
          "--set", "qa.retriever_init=frozen"], "qa.retriever_init"),
        (["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(tmp_path / "x"),
          "--set", "model.hidden=32"], "model.hidden: a fine-tune keeps"),
        (["evaluate", "--qa", str(tmp_path / "q.jsonl"), "--run", str(pretrained)], "not a fine-tune run"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and err.count("\n") == 1, (argv, err)


def test_a_batch_the_trainers_cannot_split_stops_before_any_work(pretrained, tmp_path):
    """Three trainers and qa.batch_size=16: the error comes from the constructor, before questions, index or model."""
    from realm_hpc.config import ConfigError, load_config
    from realm_hpc.dist import TrainerGroup
    from realm_hpc.finetune import Finetuner
    from realm_hpc.recipes import FINETUNE_RECIPES

    cfg = load_config(str(pretrained / "config.json"))
    cfg.qa = FINETUNE_RECIPES["qa-tiny"]().qa
    cfg.qa.pretrained, cfg.qa.batch_size = str(pretrained), 16
    with pytest.raises(ConfigError, match=r"^qa\.batch_size=16 is not divisible by trainers \(3\)"):
        Finetuner(cfg, tmp_path / "ft", group=TrainerGroup(0, 3))
    assert not (tmp_path / "ft").exists()


def test_bad_qa_file_stops_with_file_and_line(pretrained, tmp_path, capsys):
    bad = tmp_path / "bad.qa.csv"
    bad.write_text("q one\t['x']\nq two\t['y'\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(tmp_path / "ft"),
              "--set", f"qa.train={bad}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {bad}:2: ")


def test_swapped_corpus(pretrained, tmp_path, capsys):
    """qa.corpus: retrieval runs over another corpus, tokenized with the pretrained tokenizer and indexed by the
    pretrained doc encoder; here the pretraining corpus without its second pages ("About X", "History of X")."""
    docs = [json.loads(line) for line in (pretrained / "data" / "corpus.jsonl").read_text().splitlines()]
    kept = [d for d in docs if not d["title"].startswith(("About ", "History of "))]
    assert 0 < len(kept) < len(docs)
    corpus = tmp_path / "swapped.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in kept), encoding="utf-8")
    out = tmp_path / "ft"
    main(["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(out),
          "--set", f"qa.corpus={corpus}", "--set", "qa.steps=2", "--set", "qa.closed_book_baseline=false",
          "--set", "qa.dev_fraction=0.02", "--set", "qa.test_fraction=0.02"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus_docs"] == len(kept) == json.loads((out / "index" / "meta.json").read_text())["count"]
    ids = {d["id"] for d in kept}
    rows = [json.loads(line) for line in (out / "eval" / "dev.predictions.jsonl").read_text().splitlines()]
    assert rows and all(set(r["doc_ids"]) <= ids for r in rows)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(kept[0]) + "\n{not json\n", encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(tmp_path / "ft2"),
              "--set", f"qa.corpus={bad}"])
    assert exit_.value.code == 2 and f"{bad}:2: " in capsys.readouterr().err


def test_the_summary_counts_the_usable_training_questions(finetuned):
    _, summary = finetuned
    assert 0 < summary["train_questions_usable"] <= summary["train_questions"]


def test_no_usable_training_question_is_refused_and_says_how_many(pretrained, tmp_path, capsys):
    """Questions whose answers no retrieved block holds 'trained' with loss 0.0 and reported success."""
    qa = tmp_path / "nowhere.qa.csv"
    qa.write_text("Who discovered polonium?\t['Marie Skłodowska-Curie']\n"
                  "In which year did the Berlin Wall fall?\t['1989']\n"
                  "What is the capital of Burkina Faso?\t['Ouagadougou']\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(tmp_path / "ft"),
              "--set", f"qa.train={qa}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the index build's progress bar
    assert exit_.value.code == 2
    assert err.startswith("error: qa.train: none of the 3 training questions has a gold answer span in its top-5")
    assert not (tmp_path / "ft").exists()  # a start that fails on its input leaves --out as it found it


def test_a_second_fine_tune_into_a_finished_out_is_refused(pretrained, finetuned, capsys):
    out, _ = finetuned
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--recipe", "qa-tiny", "--pretrained", str(pretrained), "--out", str(out),
              "--set", "qa.seed=7"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and f"--out {out} holds a run" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
