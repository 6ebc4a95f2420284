import os
import random

import numpy as np
import pytest
import torch

from realm_hpc import checkpoint as ck
from realm_hpc.checkpoint import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _draw():
    # Gaussians too: python and numpy cache the second value of each pair, which must survive the round trip.
    return (
        [random.random(), random.gauss(0, 1)],
        np.concatenate([np.random.rand(3), np.random.standard_normal(3)]).tolist(),
        torch.rand(4).tolist() + torch.randn(3).tolist(),
    )


def _tiny_state(step):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt, {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "loss": 1.25,
                        "recipe": "demo", "history": [1, 2.5, "x"], "rng": rng_state()}


def test_atomic_write_text_and_json_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello\n")
    atomic_write_json(tmp_path / "b.json", {"k": [1, 2]})
    atomic_write_text(tmp_path / "a.txt", "again\n")  # overwrite path
    assert (tmp_path / "a.txt").read_text() == "again\n"
    assert (tmp_path / "b.json").read_text().startswith("{")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"new-but-incomp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_rng_state_survives_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()  # leave a cached gaussian in python's and numpy's state
    save_checkpoint(tmp_path / "checkpoint", {"rng": rng_state()})
    expected = _draw()
    _draw()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "checkpoint")["rng"])
    assert _draw() == expected


def test_checkpoint_round_trip_model_optimizer(tmp_path):
    model, opt, state = _tiny_state(step=7)
    path = save_checkpoint(tmp_path / "checkpoint", state)
    assert path == tmp_path / "checkpoint" / "state.pt"
    torch.load(path, weights_only=True)  # the file itself is weights_only-clean, not only via our loader

    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert loaded["step"] == 7 and loaded["loss"] == 1.25 and loaded["recipe"] == "demo"
    assert loaded["history"] == [1, 2.5, "x"]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optim"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_second_save_replaces_first_and_leaves_nothing_behind(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", {"step": 1})
    save_checkpoint(tmp_path / "checkpoint", {"step": 2})
    assert load_checkpoint(tmp_path / "checkpoint")["step"] == 2
    assert os.listdir(tmp_path) == ["checkpoint"]
    assert os.listdir(tmp_path / "checkpoint") == ["state.pt"]


def _fail_replace_into(monkeypatch, dst_name):
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == dst_name:
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)


def test_crash_after_old_moved_away_recovers_new_tmp(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint"
    save_checkpoint(ckpt, {"step": 1})
    with monkeypatch.context() as m:
        _fail_replace_into(m, "checkpoint")  # old is now checkpoint.old, complete tmp never renamed in
        with pytest.raises(OSError, match="simulated crash"):
            save_checkpoint(ckpt, {"step": 2})
    assert not ckpt.exists()
    assert load_checkpoint(ckpt)["step"] == 2  # the complete tmp is newer than .old
    save_checkpoint(ckpt, {"step": 3})  # the next save cleans up the leftovers
    assert os.listdir(tmp_path) == ["checkpoint"]
    assert load_checkpoint(ckpt)["step"] == 3


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint"
    save_checkpoint(ckpt, {"step": 1})
    with monkeypatch.context() as m:
        m.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated crash")))
        with pytest.raises(OSError):
            save_checkpoint(ckpt, {"step": 2})
    assert os.listdir(tmp_path) == ["checkpoint"]
    assert load_checkpoint(ckpt)["step"] == 1


def test_only_old_left_is_loaded(tmp_path):
    ckpt = tmp_path / "checkpoint"
    save_checkpoint(ckpt, {"step": 5})
    os.replace(ckpt, tmp_path / "checkpoint.old")  # a crash between "move old away" and a complete tmp
    assert load_checkpoint(ckpt)["step"] == 5


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="state.pt"):
        load_checkpoint(tmp_path / "checkpoint")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_value_error_naming_file(tmp_path, damage):
    _, _, state = _tiny_state(step=1)
    path = save_checkpoint(tmp_path / "checkpoint", state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"checkpoint.*state\.pt"):
        load_checkpoint(tmp_path / "checkpoint")


def test_json_files_are_strict_json_with_null_for_nan(tmp_path):
    """summary.json held a bare NaN (recall with no gold example), which jq, JSON.parse and Go refuse."""
    import json

    atomic_write_json(tmp_path / "s.json", {"recall": float("nan"), "p": [1.0, float("inf"), -float("inf")],
                                            "nested": {"acc": float("nan"), "n": 3}, "ok": 0.5})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    back = json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse)
    assert back == {"recall": None, "p": [1.0, None, None], "nested": {"acc": None, "n": 3}, "ok": 0.5}


def test_a_checkpoint_that_does_not_fit_its_model_is_one_line_naming_the_parameters(tmp_path):
    state = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    with pytest.raises(ValueError) as err:
        ck.load_weights(other, state, tmp_path / "checkpoint")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'checkpoint'}: the checkpoint does not fit")
    assert "0.weight (3, 4) in the checkpoint vs (5, 4)" in message and "(+1 more)" in message
    fits = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ck.load_weights(fits, state, tmp_path / "checkpoint")
    assert all(torch.equal(fits.state_dict()[k], v) for k, v in state.items())
