import os
import sys

# Triton's interpreter must be switched on before any @triton.jit function is defined, i.e. before kernels/ is
# imported anywhere in the test session. Kernel tests force REALM_HPC_KERNELS=triton where they need it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: on 2 cores, torch's default of 2 threads collapses (10-40x slower steps) as soon as any other
# process holds a core, and the MPI tests run a trainer and a refresher side by side. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-builds its CPU comm op into ~/.cache/torch_extensions; venvs sharing that cache (other checkouts)
# rebuild it over each other (minutes under load). One cache per venv, built once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(sys.executable)),
                                                           "torch_extensions"))


import pytest  # noqa: E402

# A smaller world than the tiny recipe's: enough documents for an index, built in a few seconds.
SMALL_WORLD = ["data.world_people=60", "data.world_orgs=12", "data.world_cities=6", "data.heldout_facts=10",
               "data.eval_examples=10", "model.vocab_size=400"]


@pytest.fixture(scope="session")
def small_world() -> list[str]:
    """--set overrides that shrink the tiny recipe's world further."""
    return list(SMALL_WORLD)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory as `realm-hpc pretrain` leaves it (config.json, data/, checkpoint/) with an untrained model:
    what build-index and retrieve need, without the training."""
    import torch

    from realm_hpc.checkpoint import atomic_write_json, save_checkpoint
    from realm_hpc.config import apply_overrides
    from realm_hpc.data.examples import PretrainData
    from realm_hpc.models.realm import Realm
    from realm_hpc.recipes import get_recipe

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    run.mkdir()
    cfg = apply_overrides(get_recipe("tiny"), SMALL_WORLD)
    atomic_write_json(run / "config.json", cfg.to_dict())
    torch.manual_seed(0)
    data = PretrainData(cfg, run)
    save_checkpoint(run / "checkpoint", {"model": Realm(cfg, data.vocab_size).state_dict()})
    return run
