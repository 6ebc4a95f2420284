"""The optimizer step of the REALM loop: plain torch AdamW for a lone trainer, a DeepSpeed engine (ZeRO 1/2) for
several trainers or whenever a DeepSpeed JSON is given.

Both take one `micro_step(loss)` per micro batch and step the optimizer after the last of `grad_accum` of them, so
the loop is the same code. The run config stays the one source of truth for what it already defines (batch sizes,
learning rate, weight decay, clipping); the DeepSpeed JSON contributes what only DeepSpeed knows (ZeRO stage,
bucket sizes, optimizer type) and may not contradict the run config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from realm_hpc.config import Config, ConfigError

DEFAULT_DEEPSPEED = {"zero_optimization": {"stage": 2},
                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


def build_optimizer(model, cfg: Config, retriever_lr: float):
    opt = torch.optim.AdamW(param_groups(model, cfg, retriever_lr), weight_decay=cfg.optim.weight_decay)
    return opt, warmup_schedule(opt, cfg)


def param_groups(model, cfg: Config, retriever_lr: float) -> list[dict]:
    return [{"params": list(model.reader.parameters()), "lr": cfg.optim.lr},
            {"params": list(model.retriever.parameters()), "lr": retriever_lr}]


def warmup_schedule(opt, cfg: Config):
    warm = max(1, cfg.optim.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))


def keep_configured_lrs(sched, base_lrs: list[float]) -> None:
    """After loading optimizer + schedule state: the loaded state says where the schedule stands, the run config
    says the learning rates, so `--resume --set optim.lr=...` takes effect instead of being silently ignored."""
    sched.base_lrs = list(base_lrs)
    for group, base, factor in zip(sched.optimizer.param_groups, base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def micro_batch_size(cfg: Config, n_trainers: int) -> int:
    per = n_trainers * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by trainers ({n_trainers}) x "
                          f"train.grad_accum ({cfg.train.grad_accum})")
    return cfg.train.batch_size // per


def deepspeed_config(cfg: Config, n_trainers: int) -> dict:
    """The DeepSpeed JSON (or the ZeRO-2 default) completed from the run config."""
    where = cfg.train.deepspeed or "the default DeepSpeed config"
    if cfg.train.deepspeed:
        path = Path(cfg.train.deepspeed)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed: {path}: no such file")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        ds = json.loads(json.dumps(DEFAULT_DEEPSPEED))
    ours = {"train_batch_size": cfg.train.batch_size,
            "train_micro_batch_size_per_gpu": micro_batch_size(cfg, n_trainers),
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip}
    for key, value in ours.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{where}: {key}={ds[key]} contradicts the run config ({value}); drop it from the JSON")
        ds[key] = value
    if "optimizer" not in ds:
        ds["optimizer"] = json.loads(json.dumps(DEFAULT_DEEPSPEED["optimizer"]))
    # Per-group learning rates (reader vs retriever) come with the parameter groups; these are the defaults.
    ds["optimizer"].setdefault("params", {}).update(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where}: zero_optimization.stage={stage}: the trainers support ZeRO stages 0, 1 and 2")
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


class LocalStepper:
    """One process, torch AdamW: the single-trainer path."""

    def __init__(self, model, cfg: Config, retriever_lr: float):
        self.model, self.cfg = model, cfg
        self.module = model
        self.opt, self.sched = build_optimizer(model, cfg, retriever_lr)
        self._micro = 0

    def micro_step(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum).backward()
        self._micro += 1
        if self._micro % self.cfg.train.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load(self, ckpt: dict, run_dir: Path) -> None:
        if ckpt.get("optimizer") is not None:
            configured = list(self.sched.base_lrs)
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            keep_configured_lrs(self.sched, configured)

    def save(self, run_dir: Path, tag: str) -> None:
        pass

    def prune(self, run_dir: Path, keep: str) -> None:
        pass


class DeepSpeedStepper:
    """The trainers' DeepSpeed engine over the whole Realm module (reader, query encoder, doc encoder).

    Checkpoints: every trainer writes its ZeRO shard with `engine.save_checkpoint(run_dir/deepspeed, tag)`; the
    run's state.pt (written after, by trainer 0) names the tag, so a crash mid-save leaves state.pt pointing at the
    previous complete tag. Older tags are pruned after the commit.
    """

    def __init__(self, model, cfg: Config, retriever_lr: float, n_trainers: int):
        import deepspeed

        ds = deepspeed_config(cfg, n_trainers)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg, retriever_lr), config=ds,
            lr_scheduler=lambda opt: warmup_schedule(opt, cfg))
        self.module = self.engine

    def micro_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
        self.engine.step()  # steps the optimizer (and the schedule) only after the last micro batch

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def state(self) -> dict:
        return {"optimizer": None, "scheduler": None}

    def save(self, run_dir: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(run_dir / "deepspeed"), tag=tag, save_latest=False)

    def load(self, ckpt: dict, run_dir: Path) -> None:
        tag = ckpt.get("deepspeed_tag")
        if tag:
            configured = list(self.sched.base_lrs)
            path, _ = self.engine.load_checkpoint(str(run_dir / "deepspeed"), tag=tag)
            if path is None:
                raise FileNotFoundError(f"{run_dir / 'deepspeed' / tag}: DeepSpeed checkpoint named by state.pt")
            keep_configured_lrs(self.sched, configured)

    def prune(self, run_dir: Path, keep: str) -> None:
        for old in (run_dir / "deepspeed").glob("step*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
