"""Who does what: trainer ranks and refresher ranks, split from one MPI launch.

`mpiexec -n P realm-hpc pretrain ... --refreshers M`: the first P - M ranks train, the last M re-encode the corpus.
The trainers form a torch.distributed group among themselves (`init_trainer_group`); a torchrun launch has
trainers only, a plain launch one lone trainer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Roles:
    world_rank: int
    world_size: int
    n_refreshers: int

    @property
    def n_trainers(self) -> int:
        return self.world_size - self.n_refreshers

    @property
    def is_trainer(self) -> bool:
        return self.world_rank < self.n_trainers

    @property
    def trainer_rank(self) -> int:
        return self.world_rank if self.is_trainer else -1

    @property
    def refresher_ranks(self) -> list[int]:
        return list(range(self.n_trainers, self.world_size))

    @property
    def refresher_index(self) -> int:
        return self.world_rank - self.n_trainers


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))


def spawn_would_wait_forever(env=None) -> str | None:
    """Why MPI_Comm_spawn would never return in this launch, else None. Under srun a spawned process is a new job
    step, and a new step waits for CPUs that the running step holds, unless steps may overlap: SLURM_OVERLAP in the
    environment, as slurm/pretrain.sbatch exports it (srun's `--overlap` flag alone does not reach the tasks'
    environment, so it cannot be seen from here). Any process inside a job step counts, an mpiexec's too
    (untested there: it errs on the side of no respawn)."""
    env = os.environ if env is None else env
    if "SLURM_STEP_ID" not in env or "SLURM_OVERLAP" in env:
        return None
    return (f"this is Slurm job step {env.get('SLURM_JOB_ID', '?')}.{env['SLURM_STEP_ID']} without SLURM_OVERLAP, "
            "so a replacement refresher (a new job step) would wait forever for the CPUs this step holds")


def leave_if_finalize_would_hang(lost_a_rank: bool) -> None:
    """End this process now (exit 0, output flushed) if the run lost an MPI rank and MPI_Finalize would wait on it
    forever: mpich's does. With ULFM (Open MPI 5 under `mpiexec --with-ft ulfm`; without it a death ends the whole
    job) Finalize returns, and a process that skipped it makes mpiexec fail the job, so it goes through there."""
    if not lost_a_rank:
        return
    from mpi4py import MPI

    if getattr(MPI, "ERR_PROC_FAILED", MPI.ERR_UNKNOWN) == MPI.ERR_UNKNOWN:  # no ULFM in this MPI library
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def mpi_roles(n_refreshers: int):
    """(Roles, COMM_WORLD) for an MPI launch. Importing mpi4py initialises MPI, so only MPI runs pay for it."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    roles = Roles(comm.Get_rank(), comm.Get_size(), n_refreshers)
    if roles.n_trainers < 1:
        raise SystemExit(f"error: {comm.Get_size()} MPI ranks leave no trainer for {n_refreshers} refresher(s)")
    return roles, comm


def print0(*args, **kwargs) -> None:
    """Only the first trainer speaks."""
    if int(os.environ.get("PMI_RANK", os.environ.get("RANK", "0"))) == 0:
        print(*args, **kwargs, flush=True)


# -- the trainers' torch.distributed group ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainerGroup:
    """The trainers among themselves: rank/size in torch.distributed (size 1 = a lone trainer, no process group),
    and this trainer's device ("" = not chosen: the trainer resolves train.device itself), where the collectives put
    their tensors (nccl takes CUDA tensors only)."""
    rank: int = 0
    size: int = 1
    device: str = ""

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def comm_device(self) -> str:
        """Where this group's collective tensors live: the trainer's GPU under nccl, else the CPU."""
        return self.device if self.device.startswith("cuda") else "cpu"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def trainer_comm(comm, roles: Roles):
    """Split COMM_WORLD into the trainers' and the refreshers' communicators (collective over every rank)."""
    return comm.Split(0 if roles.is_trainer else 1, roles.world_rank)


def init_trainer_group(sub_comm=None, backend: str | None = None, force: bool = False,
                       device: str = "cpu") -> TrainerGroup:
    """Join the trainers' torch.distributed group, on this trainer's device.

    Under MPI, `sub_comm` (the trainers' communicator) supplies rank and size and carries the rendezvous: its rank
    0 picks a free port and broadcasts MASTER_ADDR/PORT. Under torchrun the environment already has them. A lone
    trainer makes no process group unless `force` (DeepSpeed needs one even at world size 1). `device` is
    train.device (auto | cpu | cuda), resolved once LOCAL_RANK is known; the backend is nccl on a GPU, else gloo.
    """
    import torch.distributed as dist

    from realm_hpc.device import backend_for, trainer_device

    if dist.is_initialized():
        return TrainerGroup(dist.get_rank(), dist.get_world_size(), str(trainer_device(device)))
    if sub_comm is not None:
        rank, size = sub_comm.Get_rank(), sub_comm.Get_size()
        addr_port = None
        if size > 1 or force:
            addr_port = sub_comm.bcast(("127.0.0.1" if size == 1 else _host_addr(), _free_port())
                                       if rank == 0 else None, root=0)
            os.environ.update(MASTER_ADDR=addr_port[0], MASTER_PORT=str(addr_port[1]))
        from mpi4py import MPI

        node = sub_comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # LOCAL_RANK = rank among this node's trainers
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=str(local_size))
        if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
            # DeepSpeed asserts LOCAL_RANK == Open MPI's OMPI_COMM_WORLD_LOCAL_RANK, which counts the node's
            # refresher ranks too, in Open MPI's own order (with 3 ranks on a node, world rank 1 can be local 2).
            os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(local_rank)
    else:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1 and force:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    resolved = str(trainer_device(device))
    if size == 1 and not force:
        return TrainerGroup(device=resolved)
    dist.init_process_group(backend=backend or backend_for(resolved), rank=rank, world_size=size)
    return TrainerGroup(rank, size, resolved)


def _host_addr() -> str:
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


# -- collectives over the trainers (no-ops for a lone trainer) --------------------------------------------------------
def sum_over_trainers(value: float, group: TrainerGroup) -> float:
    if not group.distributed:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=group.comm_device)
    dist.all_reduce(t)
    return float(t.item())


def mean_over_trainers(value: float, group: TrainerGroup) -> float:
    return value if not group.distributed else sum_over_trainers(value, group) / group.size


def max_over_trainers(value: int, group: TrainerGroup) -> int:
    if not group.distributed:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=group.comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_from_trainer0(t, group: TrainerGroup):
    """Trainer 0's tensor `t`, on every trainer (same shape and dtype everywhere; returned where `t` was)."""
    if not group.distributed:
        return t
    import torch.distributed as dist

    buf = t.detach().to(group.comm_device).contiguous()
    dist.broadcast(buf, src=0)
    return buf.to(t.device)


def gather_over_trainers(obj, group: TrainerGroup) -> list:
    """Every trainer's `obj`, in trainer order (picklable objects; nccl moves them through the current device,
    which `trainer_device` set)."""
    if not group.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * group.size
    dist.all_gather_object(out, obj)
    return out


def barrier(group: TrainerGroup) -> None:
    if group.distributed:
        import torch
        import torch.distributed as dist

        if group.comm_device.startswith("cuda"):  # nccl: name the GPU, or it guesses one from the rank
            dist.barrier(device_ids=[torch.device(group.comm_device).index])
        else:
            dist.barrier()
