"""Who does what: trainer ranks and refresher ranks, split from one MPI launch.

`mpiexec -n P realm-hpc pretrain ...`: the first P - M ranks train, the last M re-encode the corpus. Without
MPI (a plain or torchrun launch) the process is a lone trainer.
"""

from __future__ import annotations

import os
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
