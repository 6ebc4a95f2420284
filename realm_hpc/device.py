"""Where a process computes: a trainer's device (`train.device`) and a refresher's (`refresh.device`), and whether
its CUDA kernels must give the same results on every run (`train.deterministic`).

auto | cpu | cuda. A trainer under auto takes the GPU of its node-local rank when CUDA is there and the node has a
GPU for every trainer on it: nccl (the trainers' backend on GPUs) refuses two ranks on one GPU, so with fewer GPUs
than trainers auto stays on the CPU (gloo) and says so, and an explicit `cuda` is an error. Refreshers talk to no
one over nccl, so they share GPUs round-robin by node-local rank.
"""

from __future__ import annotations

import os
import sys

import torch

from realm_hpc.config import DEVICES, ConfigError


def _check(spec: str, key: str) -> None:
    if spec not in DEVICES:
        raise ConfigError(f"{key} must be 'auto', 'cpu' or 'cuda', got {spec!r}")


def _no_cuda(key: str) -> ConfigError:
    return ConfigError(f"{key}=cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                       f"use {key}=auto or {key}=cpu")


def _on_gpu(index: int) -> torch.device:
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # nccl collectives and DeepSpeed use the current device
    return device


def trainer_device(spec: str, local_rank: int | None = None, local_size: int | None = None,
                   key: str = "train.device") -> torch.device:
    """The device of a trainer with node-local rank `local_rank` of `local_size` trainers on its node (default:
    LOCAL_RANK / LOCAL_WORLD_SIZE, as torchrun and `init_trainer_group` set them; a lone trainer is 0 of 1)."""
    _check(spec, key)
    if spec == "cpu":
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_size is None:
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_size = max(local_size, local_rank + 1)
    if not torch.cuda.is_available():
        if spec == "cuda":
            raise _no_cuda(key)
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_size > n:
        if spec == "cuda":
            raise ConfigError(f"{key}=cuda: {local_size} trainers on this node but {n} GPU(s); nccl needs a GPU "
                              "per trainer (start fewer trainers per node)")
        if local_rank == 0:
            print(f"warning: {local_size} trainers on this node share {n} GPU(s): {key}=auto trains on the CPU "
                  f"(nccl needs a GPU per trainer)", file=sys.stderr, flush=True)
        return torch.device("cpu")
    return _on_gpu(local_rank % n)


def refresher_device(spec: str, node_rank: int, key: str = "refresh.device") -> torch.device:
    """A refresher's device: GPU `node_rank % device_count` (node_rank: its rank among all of its node's
    processes, trainers included), or the CPU."""
    _check(spec, key)
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if spec == "cuda":
            raise _no_cuda(key)
        return torch.device("cpu")
    return _on_gpu(node_rank % torch.cuda.device_count())


def backend_for(device: torch.device | str) -> str:
    """The trainers' torch.distributed backend: nccl for CUDA tensors, gloo for CPU ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def node_local_rank() -> int:
    """This process's rank among its node's processes, from the launcher's environment (0 when none says)."""
    for var in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def group_device(group, spec: str) -> torch.device:
    """A trainer's device: its group's when the CLI made the group (chosen with LOCAL_RANK known), else `spec`
    (train.device) resolved here."""
    return torch.device(group.device) if group.device else trainer_device(spec)


# cuBLAS's setting for reproducible results (NVIDIA's docs; torch raises on a cuBLAS call in deterministic mode without
# it). cuBLAS reads it when CUDA creates its handles, so it must be in the environment before CUDA initialises.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_deterministic(enabled: bool) -> None:
    """train.deterministic: torch.use_deterministic_algorithms for this process (on or off: the config decides), and
    with it CUBLAS_WORKSPACE_CONFIG unless the environment sets one. Call before anything touches CUDA: the launch
    does so first in every trainer and refresher. On CUDA it makes e.g. the copy head's scatter_add_ and the
    embedding backward deterministic (a few percent slower); an op with no deterministic CUDA kernel then raises
    instead of running. On the CPU it changes nothing this project runs."""
    if enabled:
        if torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            print("warning: train.deterministic set after CUDA initialised: cuBLAS may keep its default workspace "
                  f"(export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_CONFIG} before the launch)",
                  file=sys.stderr, flush=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(enabled)
