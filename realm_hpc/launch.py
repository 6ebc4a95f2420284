"""Launching: which process does what in a pretraining or fine-tuning launch, and running it.

`mpiexec -n T+M realm-hpc pretrain ... --refreshers M`: the first T ranks train (a torch.distributed group among
themselves), the last M serve the index refresh; `torchrun` and a plain launch have trainers only. A refresher
spawned by the trainers to replace a lost one (`realm-hpc refresher`) serves like the launch's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

from realm_hpc import preempt
from realm_hpc.config import Config, ConfigError, load_config
from realm_hpc.dist import (TrainerGroup, barrier, init_trainer_group, launched_by_mpi, leave_if_finalize_would_hang,
                            mpi_roles, print0, spawn_would_wait_forever, trainer_comm)
from realm_hpc.metrics import format_summary
from realm_hpc.runs import check_out, check_resume_checkpoint, starting, write_run_config


def trainer_group(cfg: Config) -> TrainerGroup:
    """Every rank a trainer: mpiexec (COMM_WORLD), torchrun (RANK/WORLD_SIZE), or a plain launch (one trainer)."""
    if launched_by_mpi():
        from mpi4py import MPI

        return init_trainer_group(MPI.COMM_WORLD, force=bool(cfg.train.deepspeed), device=cfg.train.device)
    return init_trainer_group(None, force=bool(cfg.train.deepspeed), device=cfg.train.device)


def leave_trainer_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_run_dir(out: Path, cfg: Config, group: TrainerGroup, resume: bool, overwrite: bool) -> None:
    """Every trainer looks at --out before trainer 0 writes anything there (a trainer that looked after would see
    the new run's config.json)."""
    check_out(out, resume, overwrite)
    if resume:
        check_resume_checkpoint(out, cfg, group.size)
    barrier(group)


# -- pretraining -----------------------------------------------------------------------------------------------------
def pretrain(cfg: Config, run_dir: Path, resume: bool = False, refreshers: int | None = None,
             overwrite: bool = False) -> dict | None:
    """Run this process's part of a pretraining launch: a trainer runs the `Pretrainer` (trainer 0 prints the
    summary), a refresher rank serves index refreshes until the trainers stop it (returns None)."""
    import torch

    from realm_hpc.device import set_deterministic
    from realm_hpc.train import Pretrainer

    set_deterministic(cfg.train.deterministic)  # before CUDA initialises (cuBLAS reads its workspace setting then)
    factory, roles, comm, made = None, None, None, []
    if refreshers is not None and cfg.refresh.mode != "mpi":
        raise ConfigError(f"--refreshers {refreshers} asks for refresher ranks, but refresh.mode="
                          f"{cfg.refresh.mode}: drop one of them")
    if cfg.refresh.mode == "mpi":
        if not launched_by_mpi():
            raise ConfigError("refresh.mode=mpi needs an MPI launch: mpiexec -n 2 realm-hpc pretrain ...")
        n_refreshers = 1 if refreshers is None else refreshers
        if n_refreshers < 1:
            raise ConfigError("--refreshers must be >= 1 (for inline refresh: --set refresh.mode=inline)")
        roles, comm = mpi_roles(n_refreshers=n_refreshers)
        sub = trainer_comm(comm, roles)
        if not roles.is_trainer:
            torch.set_num_threads(1)  # the trainers keep the cores; a refresher is busy only between swaps
            serve_refresher(comm, roles.refresher_index, roles.n_refreshers)
            return None
        group = init_trainer_group(sub, force=bool(cfg.train.deepspeed), device=cfg.train.device)
        from realm_hpc.retrieval.refresh import MPIRefresher, RefresherSpawner, TrainerBroadcastRefresher

        respawn = cfg.refresh.respawn
        if respawn and (why := spawn_would_wait_forever()):
            print0(f"warning: refresh.respawn off: {why}; a lost refresher leaves the last index "
                   "(export SLURM_OVERLAP=1 before srun to allow replacements)", file=sys.stderr)
            respawn = False
        spawner = RefresherSpawner(sub, roles.n_refreshers) if respawn else None

        def factory(data):
            inner = None
            if group.rank == 0:
                inner = MPIRefresher(comm, roles.refresher_ranks, len(data.blocks), cfg.model.proj_dim,
                                     cfg.refresh.every, str(run_dir), timeout_s=cfg.refresh.timeout_s,
                                     spawner=None if group.distributed else spawner)
            made.append(inner if not group.distributed else
                        TrainerBroadcastRefresher(inner, group, len(data.blocks), cfg.model.proj_dim, spawner))
            return made[-1]
    else:  # inline refresh: every rank is a trainer
        group = trainer_group(cfg)
    check_run_dir(run_dir, cfg, group, resume, overwrite)
    try:
        with starting(run_dir, resume, overwrite, writer=group.rank == 0):
            write_run_config(run_dir, cfg, group)  # the others read run_dir/data only after trainer 0 created it
            summary = Pretrainer(cfg, run_dir, resume=resume, refresher_factory=factory, group=group).run()
    except BaseException as e:
        # A preemption in the REALM loop already stopped the refreshers (the loop closes its refresher).
        if factory is not None and group.rank == 0 and not (isinstance(e, preempt.Preempted) and e.checkpointed):
            _stop_refreshers(made[0] if made else None, comm, roles)
        raise
    leave_trainer_group()
    print0(format_summary(summary))
    print0(f"wrote {run_dir / 'summary.json'}, {run_dir / 'metrics.jsonl'}, {run_dir / 'curves.png'}")
    leave_if_finalize_would_hang(bool(made and made[0].losses))  # the run's files are written
    return summary


def _stop_refreshers(refresher, comm, roles) -> None:
    """Let the refreshers exit instead of waiting forever for a trainer that failed."""
    from realm_hpc.retrieval.refresh import TAG_STOP

    inner = getattr(refresher, "inner", refresher)  # the MPIRefresher: it knows the refreshers in use
    talk, ranks = (inner.comm, inner.refreshers) if inner is not None else (comm, roles.refresher_ranks)
    for r in ranks:
        talk.isend("lost" if inner is not None and inner.losses else None, dest=r, tag=TAG_STOP)


# -- refresher ranks -------------------------------------------------------------------------------------------------
def replacement_refresher() -> None:
    """`realm-hpc refresher`: a process the trainers spawned (MPI_Comm_spawn) to replace a lost refresher."""
    from mpi4py import MPI  # first: the trainers wait in MPI_Comm_spawn until this process has initialised MPI

    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        raise ConfigError("realm-hpc refresher is started by the trainers (MPI_Comm_spawn), not by hand")
    import torch

    torch.set_num_threads(1)
    serve_refresher(parent, shard_index=parent.Get_rank(), n_shards=parent.Get_size())
    leave_if_finalize_would_hang(True)  # spawned after a rank died: its Finalize would wait on the dead one


def serve_refresher(comm, shard_index: int, n_shards: int) -> None:
    """Re-encode this refresher's shard of the corpus whenever trainer 0 sends weights, until it says stop."""
    from realm_hpc.retrieval.refresh import serve_refresher as serve

    def make_encoder(run_dir: str):
        from realm_hpc.data.blocks import BlockStore
        from realm_hpc.data.tokenizer import load_tokenizer
        from realm_hpc.device import node_local_rank, refresher_device, set_deterministic
        from realm_hpc.models.encoders import Encoder

        cfg = load_config(str(Path(run_dir) / "config.json"))
        set_deterministic(cfg.train.deterministic)  # the index it encodes decides what the trainers retrieve
        tokenizer = load_tokenizer(cfg.model.pretrained or Path(run_dir) / "data" / "tokenizer")
        # The weights arrive as CPU floats (load_flat_params copies them in); embeddings go back as CPU numpy.
        device = refresher_device(cfg.refresh.device, node_local_rank())
        encoder = Encoder(cfg.model, len(tokenizer), cfg.model.block_len).to(device)
        return encoder, BlockStore.open(Path(run_dir) / "data" / "blocks"), cfg.refresh.batch_size

    stop = serve(comm, trainer=0, shard_index=shard_index, n_shards=n_shards, make_encoder=make_encoder)
    leave_if_finalize_would_hang(stop == "lost")  # replaced after another rank died


# -- fine-tuning -----------------------------------------------------------------------------------------------------
def finetune(cfg: Config, out: Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Every rank a trainer (mpiexec, torchrun or one process); trainer 0 prints the summary."""
    from realm_hpc.device import set_deterministic
    from realm_hpc.finetune import Finetuner

    set_deterministic(cfg.train.deterministic)
    group = trainer_group(cfg)
    check_run_dir(out, cfg, group, resume, overwrite)
    with starting(out, resume, overwrite, writer=group.rank == 0):
        write_run_config(out, cfg, group)
        summary = Finetuner(cfg, out, resume=resume, group=group).run()
    leave_trainer_group()
    print0(format_summary(summary))
    print0(f"wrote {out / 'summary.json'}, {out / 'eval'}/, {out / 'metrics.jsonl'}")
    return summary
