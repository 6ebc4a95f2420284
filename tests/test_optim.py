"""The DeepSpeed config the trainers get: the JSON's engine settings completed from the run config, never a
silent disagreement between the two."""

import json
from pathlib import Path

import pytest
import torch

from realm_hpc.config import ConfigError
from realm_hpc.optim import LocalStepper, param_groups, deepspeed_config, micro_batch_size
from realm_hpc.recipes import get_recipe

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name,stage", [("ds_zero1.json", 1), ("ds_zero2.json", 2)])
def test_shipped_json_is_completed_from_the_run_config(name, stage):
    cfg = get_recipe("tiny")
    cfg.train.deepspeed, cfg.train.batch_size, cfg.train.grad_accum = str(CONFIGS / name), 16, 2
    ds = deepspeed_config(cfg, n_trainers=2)
    assert ds["zero_optimization"]["stage"] == stage
    sizes = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert sizes == (16, 4, 2)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 2 * ds["gradient_accumulation_steps"]
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr and ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["optimizer"]["params"]["torch_adam"] is True  # the CPU-safe AdamW (../shared/FACTS.md)


def test_contradictions_and_bad_files_are_one_line_errors(tmp_path):
    cfg = get_recipe("tiny")
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    cfg.train.deepspeed = str(bad)
    with pytest.raises(ConfigError, match=r"ds\.json: train_batch_size=64 contradicts the run config \(16\)"):
        deepspeed_config(cfg, 1)
    bad.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="stage=3"):
        deepspeed_config(cfg, 1)
    bad.write_text('{\n  "zero_optimization": ,\n}')
    with pytest.raises(ConfigError, match=r"ds\.json:2: invalid JSON"):
        deepspeed_config(cfg, 1)
    cfg.train.deepspeed = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="missing.json: no such file"):
        deepspeed_config(cfg, 1)
    with pytest.raises(ConfigError, match=r"train.batch_size=16 is not divisible by trainers \(3\)"):
        micro_batch_size(cfg, 3)


def test_default_without_a_json_is_zero2():
    cfg = get_recipe("tiny")
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 8


class _TwoParts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.reader, self.retriever = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)


def test_resume_keeps_the_schedule_position_and_takes_the_configured_lrs():
    """Loading a checkpoint restores where the warm-up stands, not the old learning rates: a resume with
    `--set optim.retriever_lr_scale=...` must train with the new rate."""
    cfg = get_recipe("tiny")
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 10
    old = LocalStepper(_TwoParts(), cfg, retriever_lr=1e-4)
    for _ in range(4):
        old.micro_step(old.model.reader(torch.ones(1, 3)).sum() + old.model.retriever(torch.ones(1, 3)).sum())
    assert [g["lr"] for g in old.opt.param_groups] == pytest.approx([1e-3 * 5 / 10, 1e-4 * 5 / 10])
    cfg.optim.lr = 2e-3
    new = LocalStepper(_TwoParts(), cfg, retriever_lr=6e-4)
    new.load(old.state(), run_dir=None)
    assert [g["lr"] for g in new.opt.param_groups] == pytest.approx([2e-3 * 5 / 10, 6e-4 * 5 / 10])
    assert new.sched.last_epoch == 4 and new.lr() == pytest.approx(2e-3 * 5 / 10)
    for _ in range(6):  # the warm-up ends at the configured rates
        new.micro_step(new.model.reader(torch.ones(1, 3)).sum() + new.model.retriever(torch.ones(1, 3)).sum())
    assert [g["lr"] for g in new.opt.param_groups] == pytest.approx([2e-3, 6e-4])


def test_head_lr_scale_gives_the_reader_heads_their_own_group():
    from realm_hpc.models.realm import Realm

    cfg = get_recipe("tiny")
    cfg.model.vocab_size, cfg.model.hidden, cfg.model.intermediate, cfg.model.layers = 100, 16, 32, 1
    model = Realm(cfg, 100)
    assert len(param_groups(model, cfg, 1e-4)) == 2
    cfg.optim.lr, cfg.optim.head_lr_scale = 1e-4, 20.0
    body, retriever, heads = param_groups(model, cfg, 5e-5)
    assert (body["lr"], retriever["lr"], heads["lr"]) == pytest.approx((1e-4, 5e-5, 2e-3))
    ids = [id(p) for g in (body, retriever, heads) for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    head_ids = {id(p) for p in heads["params"]}
    assert {id(p) for p in model.reader.copy_query.parameters()} <= head_ids  # the copy head (tiny has one)
    assert id(model.reader.mlm.cls.predictions.transform.dense.weight) in head_ids
    # The tied output embedding is the BERT body's word embedding, not a head parameter.
    assert id(model.reader.mlm.bert.embeddings.word_embeddings.weight) not in head_ids
