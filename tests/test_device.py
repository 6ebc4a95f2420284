"""train.device / refresh.device resolution and the trainers' backend, with CUDA faked (torch.cuda.set_device is
stubbed: no GPU is touched), and the CPU path of the device plumbing (Batch.to, LiveIndex placement)."""

import pytest
import torch

from realm_hpc.config import Config, ConfigError, apply_overrides
from realm_hpc.device import backend_for, node_local_rank, refresher_device, trainer_device


@pytest.fixture
def cuda(monkeypatch):
    """Fake `n` visible GPUs; returns the list of devices set_device was called with."""
    chosen = []

    def fake(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
        return chosen

    _unset(monkeypatch, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return fake


def _unset(monkeypatch, *names):
    """Unset for the test and restored after it, also when the code under test sets them (init_trainer_group)."""
    for var in names:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_auto_without_cuda_is_cpu(cuda):
    chosen = cuda(0)
    assert trainer_device("auto") == torch.device("cpu")
    assert refresher_device("auto", node_rank=3) == torch.device("cpu")
    assert chosen == []


def test_auto_with_cuda_takes_the_local_rank_gpu(cuda, monkeypatch):
    chosen = cuda(4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert trainer_device("auto") == torch.device("cuda", 2)
    assert chosen == [torch.device("cuda", 2)]  # set as the current device (nccl, DeepSpeed)
    assert trainer_device("cuda", local_rank=3, local_size=4) == torch.device("cuda", 3)
    assert trainer_device("auto", local_rank=0, local_size=1) == torch.device("cuda", 0)  # a lone trainer


def test_cpu_stays_cpu_with_cuda(cuda):
    chosen = cuda(8)
    assert trainer_device("cpu", local_rank=1, local_size=2) == torch.device("cpu")
    assert refresher_device("cpu", node_rank=5) == torch.device("cpu")
    assert chosen == []


def test_cuda_without_cuda_is_an_error_naming_the_key(cuda):
    cuda(0)
    with pytest.raises(ConfigError, match=r"train\.device=cuda") as err:
        trainer_device("cuda")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"refresh\.device=cuda"):
        refresher_device("cuda", node_rank=0)


def test_more_trainers_than_gpus_auto_falls_back_cuda_fails(cuda, capsys):
    """nccl refuses two ranks on one GPU: auto trains on the CPU (and says so once, on local rank 0)."""
    cuda(1)
    assert trainer_device("auto", local_rank=0, local_size=2) == torch.device("cpu")
    assert trainer_device("auto", local_rank=1, local_size=2) == torch.device("cpu")
    assert capsys.readouterr().err.count("train.device=auto trains on the CPU") == 1
    with pytest.raises(ConfigError, match=r"train\.device=cuda: 2 trainers on this node but 1 GPU"):
        trainer_device("cuda", local_rank=1, local_size=2)
    # LOCAL_RANK beyond LOCAL_WORLD_SIZE (a launcher that sets only the rank) still counts that many trainers
    assert trainer_device("auto", local_rank=1, local_size=1) == torch.device("cpu")


def test_refreshers_share_gpus_round_robin(cuda):
    chosen = cuda(2)
    assert [refresher_device("auto", r) for r in range(5)] == [torch.device("cuda", r % 2) for r in range(5)]
    assert refresher_device("cuda", 3) == torch.device("cuda", 1)
    assert chosen[-1] == torch.device("cuda", 1)


def test_backend_is_nccl_on_cuda_gloo_on_cpu():
    assert backend_for("cuda:1") == "nccl"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    assert backend_for("cpu") == "gloo"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_init_trainer_group_picks_the_backend_from_the_device(cuda, monkeypatch):
    """A forced one-trainer group (DeepSpeed's case): nccl on a (faked) GPU; the init call is captured."""
    import torch.distributed as dist

    from realm_hpc.dist import init_trainer_group

    cuda(2)
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    _unset(monkeypatch, "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    group = init_trainer_group(None, force=True, device="auto")
    assert calls[-1]["backend"] == "nccl" and group.device == "cuda:0" and group.comm_device == "cuda:0"
    group = init_trainer_group(None, force=True, device="cpu")
    assert calls[-1]["backend"] == "gloo" and group.device == "cpu" and group.comm_device == "cpu"
    lone = init_trainer_group(None, device="auto")  # no process group for a lone trainer, but its device
    assert len(calls) == 2 and lone.device == "cuda:0" and not lone.distributed


def test_device_keys_are_validated():
    assert Config().train.device == "auto" and Config().refresh.device == "auto"
    cfg = apply_overrides(Config(), ["train.device=cpu", "refresh.device=cuda"])
    assert (cfg.train.device, cfg.refresh.device) == ("cpu", "cuda")
    for key in ("train.device", "refresh.device"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            apply_overrides(Config(), [f"{key}=gpu"])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.device"):
        trainer_device("tpu")


def test_node_local_rank_reads_the_launcher(monkeypatch):
    _unset(monkeypatch, "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "SLURM_LOCALID",
           "LOCAL_RANK")
    assert node_local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert node_local_rank() == 3
    monkeypatch.setenv("MPI_LOCALRANKID", "1")  # hydra's, before srun's
    assert node_local_rank() == 1


def test_batch_to_the_same_device_is_the_batch_itself():
    from realm_hpc.data.examples import Batch

    b = Batch(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), [], torch.zeros(2, 1,
              dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.tensor([0, 1]))
    assert b.to("cpu") is b


def test_live_index_moves_swapped_snapshots_to_its_device():
    from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex

    emb = torch.randn(6, 4)
    live = LiveIndex(IndexSnapshot(emb, 1, 0), device="cpu")
    assert live.snapshot.embeddings is emb  # already there: no copy
    live.swap(IndexSnapshot(emb * 2, 2, 5))
    assert live.device == torch.device("cpu") and live.version == 2
    scores, ids = live.search(torch.randn(3, 4), 2, torch.tensor([0, -1, 5]))
    assert scores.shape == ids.shape == (3, 2) and not (ids[0] == 0).any() and not (ids[2] == 5).any()



def test_deterministic_sets_torch_and_cublas_and_the_config_can_turn_it_off(monkeypatch):
    from realm_hpc.device import CUBLAS_WORKSPACE_CONFIG, set_deterministic

    _unset(monkeypatch, "CUBLAS_WORKSPACE_CONFIG")
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the environment's own choice is kept
        set_deterministic(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        set_deterministic(False)  # a later run in the same process follows its own config
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert apply_overrides(Config(), ["train.deterministic=true"]).train.deterministic is True
