"""The optimizer step of the REALM and Open-QA loops: plain torch AdamW for a lone trainer, a DeepSpeed engine
(ZeRO 1/2) for several trainers or whenever a DeepSpeed JSON is given (`make_stepper`).

Both take one `micro_step(loss)` per micro batch and step the optimizer after the last of `grad_accum` of them, so
the loop is the same code. The run config stays the one source of truth for what it already defines (batch sizes,
learning rate, weight decay, clipping); the DeepSpeed JSON contributes what only DeepSpeed knows (ZeRO stage,
bucket sizes, optimizer type) and may not contradict the run config. Which config keys make a step is a `StepPlan`:
pretraining's train/optim sections, or fine-tuning's qa section; a Config given where a plan is expected means its
pretraining plan.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from realm_hpc.config import Config, ConfigError, read_json

DEFAULT_DEEPSPEED = {"zero_optimization": {"stage": 2},
                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step is made of, and the config section that sets the batch (named in errors)."""
    section: str  # "train" (pretraining) or "qa" (fine-tuning)
    batch_size: int  # the global batch of a step, over all trainers and micro batches
    grad_accum: int
    lr: float  # the reader's; the retriever's comes with its parameter group
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    deepspeed: str  # a DeepSpeed JSON, or "" for the default
    head_lr_scale: float = 1.0  # the reader's heads vs its BERT body (pretraining's optim.head_lr_scale)


def step_plan(cfg: Config | StepPlan, section: str = "train") -> StepPlan:
    """The pretraining ("train") or fine-tuning ("qa", no accumulation) step of a run config."""
    if isinstance(cfg, StepPlan):
        return cfg
    if section == "qa":
        return StepPlan("qa", cfg.qa.batch_size, 1, cfg.qa.lr, cfg.qa.warmup_steps, cfg.optim.weight_decay,
                        cfg.optim.grad_clip, cfg.train.deepspeed)
    return StepPlan("train", cfg.train.batch_size, cfg.train.grad_accum, cfg.optim.lr, cfg.optim.warmup_steps,
                    cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.train.deepspeed, cfg.optim.head_lr_scale)


def build_optimizer(model, cfg: Config | StepPlan, retriever_lr: float):
    plan = step_plan(cfg)
    opt = torch.optim.AdamW(param_groups(model, plan, retriever_lr), weight_decay=plan.weight_decay)
    return opt, warmup_schedule(opt, plan)


def param_groups(model, cfg: Config | StepPlan, retriever_lr: float) -> list[dict]:
    """The reader at the plan's learning rate, the retriever side (`model.retriever`) at `retriever_lr`; with
    head_lr_scale != 1 the reader's heads (everything but its BERT body `mlm.bert`) get their own group."""
    plan = step_plan(cfg)
    # A frozen doc encoder (train.freeze_doc_encoder) stays out of the optimizer (DeepSpeed wants trainable ones only)
    retriever = {"params": [p for p in model.retriever.parameters() if p.requires_grad], "lr": retriever_lr}
    if plan.head_lr_scale == 1.0:
        return [{"params": list(model.reader.parameters()), "lr": plan.lr}, retriever]
    named = list(model.reader.named_parameters())
    body = [p for name, p in named if name.startswith("mlm.bert.")]
    heads = [p for name, p in named if not name.startswith("mlm.bert.")]
    return [{"params": body, "lr": plan.lr}, retriever, {"params": heads, "lr": plan.lr * plan.head_lr_scale}]


def warmup_schedule(opt, cfg: Config | StepPlan):
    warm = max(1, step_plan(cfg).warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))


def keep_configured_lrs(sched, base_lrs: list[float]) -> None:
    """After loading optimizer + schedule state: the loaded state says where the schedule stands, the run config
    says the learning rates, so `--resume --set optim.lr=...` takes effect instead of being silently ignored."""
    sched.base_lrs = list(base_lrs)
    for group, base, factor in zip(sched.optimizer.param_groups, base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def micro_batch_size(cfg: Config | StepPlan, n_trainers: int) -> int:
    plan = step_plan(cfg)
    per = n_trainers * plan.grad_accum
    if plan.batch_size % per:
        accum = f" x {plan.section}.grad_accum ({plan.grad_accum})" if plan.section == "train" else ""
        raise ConfigError(f"{plan.section}.batch_size={plan.batch_size} is not divisible by trainers ({n_trainers})"
                          f"{accum}")
    return plan.batch_size // per


def deepspeed_config(cfg: Config | StepPlan, n_trainers: int) -> dict:
    """The DeepSpeed JSON (or the ZeRO-2 default) completed from the run config."""
    plan = step_plan(cfg)
    where = plan.deepspeed or "the default DeepSpeed config"
    if plan.deepspeed:
        path = Path(plan.deepspeed)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed: {path}: no such file")
        ds = read_json(path)
    else:
        ds = json.loads(json.dumps(DEFAULT_DEEPSPEED))
    ours = {"train_batch_size": plan.batch_size,
            "train_micro_batch_size_per_gpu": micro_batch_size(plan, n_trainers),
            "gradient_accumulation_steps": plan.grad_accum,
            "gradient_clipping": plan.grad_clip}
    for key, value in ours.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{where}: {key}={ds[key]} contradicts the run config ({value}); drop it from the JSON")
        ds[key] = value
    if "optimizer" not in ds:
        ds["optimizer"] = json.loads(json.dumps(DEFAULT_DEEPSPEED["optimizer"]))
    # Per-group learning rates (reader vs retriever) come with the parameter groups; these are the defaults.
    ds["optimizer"].setdefault("params", {}).update(lr=plan.lr, weight_decay=plan.weight_decay)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where}: zero_optimization.stage={stage}: the trainers support ZeRO stages 0, 1 and 2")
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def check_step_plan(cfg: Config | StepPlan, n_trainers: int) -> None:
    """What make_stepper will need, checked when a run starts rather than after its ICT warm start: a batch the
    trainers can split, and a DeepSpeed JSON that exists and agrees with the run config."""
    plan = step_plan(cfg)
    micro_batch_size(plan, n_trainers)
    if n_trainers > 1 or plan.deepspeed:
        deepspeed_config(plan, n_trainers)


def make_stepper(model, cfg: Config | StepPlan, retriever_lr: float, n_trainers: int):
    """DeepSpeed for several trainers or a DeepSpeed JSON, else plain AdamW."""
    plan = step_plan(cfg)
    if n_trainers > 1 or plan.deepspeed:
        return DeepSpeedStepper(model, plan, retriever_lr, n_trainers)
    return LocalStepper(model, plan, retriever_lr)


class LocalStepper:
    """One process, torch AdamW: the single-trainer path."""

    def __init__(self, model, cfg: Config | StepPlan, retriever_lr: float):
        self.model, self.plan = model, step_plan(cfg)
        self.module = model
        self.opt, self.sched = build_optimizer(model, self.plan, retriever_lr)
        self._micro = 0

    def micro_step(self, loss: torch.Tensor) -> None:
        (loss / self.plan.grad_accum).backward()
        self._micro += 1
        if self._micro % self.plan.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.plan.grad_clip)
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
        """Nothing beside state(): returns no DeepSpeed tag."""

    def prune(self, run_dir: Path, keep: str) -> None:
        pass


def use_deepspeed_accelerator(device: torch.device) -> None:
    """DeepSpeed's accelerator follows the trainer's device, not the environment: DS_ACCELERATOR=cpu (the Makefile's,
    for CPU runs) would move a GPU trainer's engine to the CPU, and DeepSpeed's own detection would move a
    train.device=cpu trainer to the GPU of a GPU node. Set before DeepSpeed is first imported where possible."""
    name = "cuda" if device.type == "cuda" else "cpu"
    if "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = name
        return
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != name:
        if name == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        set_accelerator(Accelerator())


class DeepSpeedStepper:
    """The trainers' DeepSpeed engine over the whole trained module (Realm: reader, query and doc encoder; QAModel:
    span reader and query encoder).

    Checkpoints: every trainer writes its ZeRO shard with `engine.save_checkpoint(run_dir/deepspeed, tag)`; the
    run's state.pt (written after, by trainer 0) names the tag, so a crash mid-save leaves state.pt pointing at the
    previous complete tag. Older tags are pruned after the commit.
    """

    def __init__(self, model, cfg: Config | StepPlan, retriever_lr: float, n_trainers: int):
        device = next(model.parameters()).device
        use_deepspeed_accelerator(device)
        import deepspeed

        plan = step_plan(cfg)
        ds = deepspeed_config(plan, n_trainers)
        # On a GPU the engine's device is the trainer's (device_rank); on the CPU DeepSpeed's default (LOCAL_RANK).
        args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            args=args, model=model, model_parameters=param_groups(model, plan, retriever_lr), config=ds,
            lr_scheduler=lambda opt: warmup_schedule(opt, plan))
        self.module = self.engine

    def micro_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
        self.engine.step()  # steps the optimizer (and the schedule) only after the last micro batch

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def state(self) -> dict:
        return {"optimizer": None, "scheduler": None}

    def save(self, run_dir: Path, tag: str) -> str:
        self.engine.save_checkpoint(str(run_dir / "deepspeed"), tag=tag, save_latest=False)
        return tag

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
