"""A run directory is never lost or made unusable (issue 18): a second run into a finished --out is refused without
--resume or --overwrite, a failed --resume or a failed start changes nothing in --out, and every bad --out is one
line. One tiny finished run (in-process, ~10 s) is shared by the module; each test works on a copy of it."""

import hashlib
import json
import shutil

import pytest

from realm_hpc.cli import main
from realm_hpc.config import ConfigError
from realm_hpc.metrics import read_metrics
from realm_hpc.runs import check_resume_checkpoint, saved_config

SMALL = ["--recipe", "tiny", "--steps", "3", "--set", "ict.steps=2", "--set", "ict.eval_every=2",
         "--set", "train.reader_warmup_steps=1", "--set", "train.eval_every=1000", "--set", "refresh.every=2",
         "--set", "data.world_people=60", "--set", "data.world_orgs=12", "--set", "data.world_cities=6",
         "--set", "data.heldout_facts=10", "--set", "model.vocab_size=400",
         "--set", "data.dev_examples=0"]  # no dev example: dev recall is undefined, and summary.json says null


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    main(["pretrain", "--out", str(run), *SMALL])
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _fingerprint(directory):
    """Every file under `directory` with a hash of its bytes: equal fingerprints, nothing changed."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _fails(argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == code, err
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_summary_json_is_strict_json(finished):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    summary = json.loads((finished / "summary.json").read_text(), parse_constant=refuse)
    assert summary["dev_examples"] == 0 and summary["dev_recall_at_8"] is None
    assert summary["dev_mlm_acc_retrieval"] is None and isinstance(summary["test_recall_at_8"], float)


def test_a_second_run_into_a_finished_out_is_refused(run, capsys):
    before = _fingerprint(run)
    err = _fails(["pretrain", "--out", str(run), *SMALL, "--set", "train.seed=7"], capsys)
    assert f"--out {run} holds a run (config.json, a checkpoint, summary.json, metrics.jsonl)" in err
    assert "--resume" in err and "another --out" in err and "--overwrite" in err
    assert _fingerprint(run) == before


def test_overwrite_replaces_the_run_and_a_failed_overwrite_keeps_it(run, tmp_path, capsys):
    before = _fingerprint(run)
    err = _fails(["pretrain", "--out", str(run), *SMALL, "--overwrite", "--set", "data.corpus=/no/such.jsonl"], capsys)
    assert "/no/such.jsonl" in err
    assert _fingerprint(run) == before  # the new start failed on its input: the old run is back, whole
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing set aside is left behind

    main(["pretrain", "--out", str(run), *SMALL, "--overwrite", "--set", "train.seed=7"])
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 7
    starts = [r for r in read_metrics(run) if r.get("phase") == "ict" and r["step"] == 0]
    assert len(starts) == 1  # metrics.jsonl holds one run, not both
    assert len(list((run / "tb").iterdir())) == 1  # one TensorBoard event file
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_resume_changes_nothing_and_names_the_keys(run, capsys):
    before = _fingerprint(run)
    err = _fails(["pretrain", "--out", str(run), "--resume", "--set", "model.hidden=32",
                  "--set", "data.world_people=50", "--set", "model.dropout=0"], capsys)
    assert "model.hidden (64 -> 32)" in err and "data.world_people (60 -> 50)" in err and "dropout" not in err
    assert _fingerprint(run) == before
    # the run is still usable: it resumes (a step count may change) and evaluates
    main(["pretrain", "--out", str(run), "--resume", "--steps", "4"])
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    main(["evaluate", "--run", str(run)])


def test_resume_where_there_is_no_run_says_so(tmp_path, run, capsys):
    err = _fails(["pretrain", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert "holds no run (no config.json)" in err and "drop --resume" in err
    assert not (tmp_path / "none").exists()
    err = _fails(["finetune", "--out", str(run), "--resume"], capsys)
    assert "holds a pretraining run: continue it with realm-hpc pretrain --resume" in err
    assert "--resume continues" in _fails(["pretrain", "--out", str(run), "--resume", "--overwrite"], capsys)


@pytest.mark.parametrize("existed", [False, True])
def test_a_start_that_fails_on_its_input_leaves_out_as_it_found_it(tmp_path, capsys, existed):
    out = tmp_path / "a" / "b"
    if existed:
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine\n")
    before = _fingerprint(tmp_path)
    # fails after config.json, data/ and metrics.jsonl were written: the corpus is read before k is checked
    err = _fails(["pretrain", "--out", str(out), *SMALL, "--set", "retrieval.k=5000"], capsys)
    assert err.startswith("error: retrieval.k=5000 is more than the embedded world can return")
    assert _fingerprint(tmp_path) == before
    assert (tmp_path / "a").exists() == existed


def test_an_out_that_cannot_be_a_run_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in _fails(["pretrain", "--out", str(tmp_path / "file"), *SMALL], capsys)
    err = _fails(["pretrain", "--out", str(tmp_path / "file" / "run"), *SMALL], capsys)
    assert "cannot create it" in err and "is not a directory" in err
    assert (tmp_path / "file").read_text() == "x"


def test_export_build_index_and_retrieve_outs_are_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for cmd in (["export", "--run", str(tiny_run)], ["build-index", "--run", str(tiny_run)]):
        err = _fails([*cmd, "--out", str(tmp_path / "file")], capsys, code=1)
        assert err == f"error: {tmp_path / 'file'}: exists and is not a directory"
    main(["build-index", "--run", str(tiny_run), "--out", str(tmp_path / "idx")])
    capsys.readouterr()
    (tmp_path / "q.txt").write_text("Where was Anna Kessler born?\n")
    err = _fails(["retrieve", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "q.txt"),
                  "--out", str(tmp_path)], capsys, code=1)
    assert err == f"error: {tmp_path}: is a directory, not a file"
    err = _fails(["retrieve", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "q.txt"),
                  "--out", str(tmp_path / "file" / "r.jsonl")], capsys, code=1)
    assert err.startswith(f"error: {tmp_path / 'file' / 'r.jsonl'}: cannot write here")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_resume_with_another_trainer_count_is_refused_where_it_matters(tmp_path):
    from realm_hpc.checkpoint import save_checkpoint
    from realm_hpc.config import Config

    cfg = Config()
    save_checkpoint(tmp_path / "checkpoint", {"deepspeed_tag": "step10", "rng_ranks": [{}, {}], "optimizer": None})
    check_resume_checkpoint(tmp_path, cfg, 2)  # as many trainers as wrote the ZeRO shards
    with pytest.raises(ConfigError, match=r"DeepSpeed shards of 2 trainer\(s\).*resume with 2 trainer\(s\)"):
        check_resume_checkpoint(tmp_path, cfg, 1)
    save_checkpoint(tmp_path / "checkpoint", {"deepspeed_tag": None, "rng_ranks": [{}], "optimizer": {"state": {}}})
    check_resume_checkpoint(tmp_path, cfg, 1)
    with pytest.raises(ConfigError, match="one trainer with plain AdamW"):
        check_resume_checkpoint(tmp_path, cfg, 2)
    # the end-of-ICT checkpoint holds no optimizer state: any trainer count may continue it
    save_checkpoint(tmp_path / "checkpoint", {"deepspeed_tag": None, "rng_ranks": [{}], "optimizer": None})
    check_resume_checkpoint(tmp_path, cfg, 3)


def test_a_fine_tune_and_a_pretraining_run_are_told_apart_on_resume(run):
    with pytest.raises(ConfigError, match="holds a pretraining run"):
        saved_config(run, "finetune")
    assert saved_config(run, "pretrain").recipe == "tiny"


def test_resume_with_a_checkpoint_of_another_vocabulary_is_refused(run):
    from realm_hpc.checkpoint import load_checkpoint, save_checkpoint
    from realm_hpc.config import load_config

    cfg = load_config(str(run / "config.json"))
    check_resume_checkpoint(run, cfg, 1)  # the run's own checkpoint and tokenizer agree
    state = load_checkpoint(run / "checkpoint")
    key = next(k for k in state["model"] if k.endswith("word_embeddings.weight"))
    rows = state["model"][key].shape[0]
    state["model"][key] = state["model"][key][: rows - 10]
    save_checkpoint(run / "checkpoint", state)
    with pytest.raises(ConfigError, match=f"embeds {rows - 10} tokens, the tokenizer .* has {rows}"):
        check_resume_checkpoint(run, cfg, 1)
