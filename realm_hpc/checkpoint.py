"""Crash-safe files: atomic writes, RNG state capture, and a whole-directory checkpoint that is swapped in atomically.

Nothing half-written is ever read: every file goes to a temp name in the same directory, is fsynced, then renamed
over its target (rename is atomic within one file system, a copy is not).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

STATE_FILE = "state.pt"


# ---------------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory. On a directory it makes a rename inside it survive a power loss, even
    though the file's bytes were already on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], Any]) -> Path:
    """Call `write_fn(f)` on a binary temp file beside `path`, fsync it, rename it over `path`.

    On any exception the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; logs and plots should be readable by the rest of the team on a shared cluster.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:  # a second error here would hide the first
            pass
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float as None: JSON has no NaN or Infinity, and strict readers (jq, JSON.parse,
    Go) refuse the bare `NaN` Python's json writes by default. A recall with no gold example is 'none', not a number."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python, numpy (global) and torch RNG states, built only from tensors/ints/floats/strings/None so that
    `torch.load(weights_only=True)` accepts them. Each rank captures its own; the caller saves them per rank."""
    py_version, py_words, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        # Mersenne Twister words are uint32; int64 holds them exactly (torch has no uint32 that pickles everywhere).
        "python": {"version": py_version, "words": torch.tensor(py_words, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": nps["bit_generator"],
            "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": nps["pos"]},
            "has_gauss": nps["has_gauss"],
            "gauss": nps["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    # A resume may land on a node with a different GPU count (or none): restore what maps, skip the rest.
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint directory
# ---------------------------------------------------------------------------------------------------------------
#
# Save protocol for <parent>/<name>/ (e.g. run_dir/checkpoint/):
#   1. write <name>.tmp-XXXX/state.pt (itself atomically, so a tmp dir holding state.pt is complete)
#   2. rename <name>/ -> <name>.old/          (if there is a previous checkpoint)
#   3. rename <name>.tmp-XXXX/ -> <name>/     (the commit point)
#   4. delete <name>.old/
# A crash anywhere leaves at least one complete state.pt: <name>/, else a complete tmp (newer), else <name>.old/.


def _old_dir(ckpt_dir: Path) -> Path:
    return ckpt_dir.with_name(ckpt_dir.name + ".old")


def _complete_tmp_dirs(ckpt_dir: Path) -> list[Path]:
    tmps = [p for p in ckpt_dir.parent.glob(ckpt_dir.name + ".tmp-*") if (p / STATE_FILE).is_file()]
    return sorted(tmps, key=lambda p: (p / STATE_FILE).stat().st_mtime_ns)


def _find_state_file(ckpt_dir: Path) -> Path | None:
    """The newest complete state.pt, wherever a crash left it. Read-only, so every rank may call it at once."""
    if (ckpt_dir / STATE_FILE).is_file():
        return ckpt_dir / STATE_FILE
    tmps = _complete_tmp_dirs(ckpt_dir)
    if tmps:
        return tmps[-1] / STATE_FILE
    if (_old_dir(ckpt_dir) / STATE_FILE).is_file():
        return _old_dir(ckpt_dir) / STATE_FILE
    return None


def _recover(ckpt_dir: Path) -> None:
    """Put the newest complete checkpoint back at `ckpt_dir` and delete crash leftovers (writer only)."""
    found = _find_state_file(ckpt_dir)
    if found is not None and found.parent != ckpt_dir:
        os.replace(found.parent, ckpt_dir)
        fsync_path(ckpt_dir.parent)
    for p in [_old_dir(ckpt_dir), *ckpt_dir.parent.glob(ckpt_dir.name + ".tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(ckpt_dir: str | os.PathLike, state: dict) -> Path:
    """Write `state` (nested dicts/lists of tensors, ints, floats, strings) to `ckpt_dir/state.pt`, replacing the
    previous checkpoint as a whole. Only the writer rank calls this. Returns the path of state.pt.

    Keep `state` to weights_only-loadable types (no dataclasses, no numpy arrays): load_checkpoint refuses others.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(ckpt_dir)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir.parent, prefix=ckpt_dir.name + ".tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; teammates should be able to read a run's checkpoint
        atomic_write(tmp / STATE_FILE, lambda f: torch.save(state, f))
        old = _old_dir(ckpt_dir)
        if ckpt_dir.exists():
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        fsync_path(ckpt_dir.parent)
    except BaseException:
        # Only an incomplete tmp is removed; a complete one may be the newest state after step 2 and stays for
        # _find_state_file / the next save's _recover.
        if not (tmp / STATE_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir / STATE_FILE


def has_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    """Whether a complete checkpoint is there (or where a crash left it)."""
    return _find_state_file(Path(ckpt_dir)) is not None


def load_checkpoint(ckpt_dir: str | os.PathLike, mmap: bool = False) -> dict:
    """Load the newest complete checkpoint under `ckpt_dir` on CPU with `weights_only=True`. mmap: tensors stay in
    the file until touched (a cheap look at its small entries).

    Raises FileNotFoundError if there is none, ValueError (naming the file) if it cannot be unpickled.
    """
    ckpt_dir = Path(ckpt_dir)
    path = _find_state_file(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint at {ckpt_dir / STATE_FILE}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except (PermissionError, FileNotFoundError):
        raise
    # A truncated zip surfaces as OSError(EINVAL) from a seek, a garbled one as RuntimeError or UnpicklingError.
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"corrupt or unloadable checkpoint {path}: {reason}") from e


# ---------------------------------------------------------------------------------------------------------------
# A trainer group's checkpoint: DeepSpeed shards + state.pt (pretraining and fine-tuning alike)
# ---------------------------------------------------------------------------------------------------------------


def save_trainer_checkpoint(run_dir: Path, group, stepper, tag: str, state: Callable[[], dict]) -> None:
    """Collective over the trainers (`group`, a dist.TrainerGroup). Each trainer's `stepper` first writes its
    DeepSpeed shard as run_dir/deepspeed/<tag> (if it has one); then trainer 0 commits run_dir/checkpoint/state.pt
    with `state()`, the stepper's optimizer state, the tag and every trainer's RNG state, so a crash in between
    leaves state.pt naming the previous complete tag. Older tags are pruned after the commit."""
    from realm_hpc.dist import barrier, gather_over_trainers

    written = stepper.save(run_dir, tag) if stepper is not None else None
    rngs = gather_over_trainers(rng_state(), group)
    if group.rank == 0:
        save_checkpoint(run_dir / "checkpoint", {
            **state(), **(stepper.state() if stepper is not None else {"optimizer": None, "scheduler": None}),
            "deepspeed_tag": written, "rng": rngs[0], "rng_ranks": rngs})
        if stepper is not None:
            stepper.prune(run_dir, tag)
    barrier(group)


def load_weights(model: torch.nn.Module, state: dict, where: str | os.PathLike) -> None:
    """`model.load_state_dict(state)`, or one ValueError naming `where` (the checkpoint) and the parameters that do
    not fit, with their shapes: torch's own error puts all of that after the first line."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} in the checkpoint vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = [*wrong, *(f"{k} missing" for k in missing), *(f"{k} unexpected" for k in unexpected)]
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ValueError(f"{where}: the checkpoint does not fit the model its config builds: {'; '.join(problems[:2])}"
                         f"{more}; was config.json changed, or the checkpoint taken from another run?")
    model.load_state_dict(state)


def set_trainer_rng_state(ckpt: dict, group) -> None:
    """This trainer's RNG state from a checkpoint; trainer 0's when the trainer count changed since."""
    ranks = ckpt.get("rng_ranks") or []
    set_rng_state(ranks[group.rank] if len(ranks) == group.size else ckpt["rng"])
