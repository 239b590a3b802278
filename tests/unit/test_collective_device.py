"""Which GPU the NCCL collectives use, and what ``init_process_group`` is given, on a CPU.

``deepspeed.init_distributed()`` and a bare ``init_process_group`` never call
``torch.cuda.set_device``: a communicator that read the current device when the optimizer was
built put every rank's buffers on GPU 0. The choice is a pure function of the backend, the
launcher's ``LOCAL_RANK``, the current device and the GPU count; a ``ProcessGroupCommunicator``
over a one-rank group with those answers faked shows it resolves the GPU at first use.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from gnlorp_dist.distributed import launch
from gnlorp_dist.distributed.communicator import (
    ProcessGroupCommunicator,
    collective_device,
    nccl_device,
)
from gnlorp_dist.distributed.launch import process_group_options


@pytest.mark.parametrize(
    ("local_rank", "current", "count", "expected"),
    [
        ("1", 0, 4, 1),  # deepspeed.init_distributed(): nothing current yet, LOCAL_RANK names it
        ("3", 0, 4, 3),
        ("1", 2, 4, 2),  # set_device was called: the process's own choice wins
        ("1", 0, 1, 0),  # one GPU visible per process (CUDA_VISIBLE_DEVICES chose it)
        (None, 0, 4, 0),  # no launcher variable: the current device
        ("x", 0, 4, 0),
        ("0", 0, 2, 0),
    ],
)
def test_nccl_device_takes_local_rank_unless_the_process_chose_a_gpu(
    local_rank, current, count, expected
):
    assert nccl_device(local_rank, current, count) == torch.device("cuda", expected)


def test_collective_device_follows_the_backend():
    env = {"LOCAL_RANK": "1"}
    assert collective_device("gloo", env, 0, 2) == torch.device("cpu")
    assert collective_device("nccl", env, 0, 2) == torch.device("cuda", 1)
    assert collective_device("cpu:gloo,cuda:nccl", env, 0, 2) == torch.device("cuda", 1)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_optimizer_built_before_set_device_uses_the_gpu_set_afterwards(
    one_rank_group, monkeypatch
):
    """An NCCL group, faked: the communicator is built while GPU 0 is current and no
    LOCAL_RANK is set (a custom launcher), then the process makes GPU 1 current. Its buffers
    go to GPU 1, and the device stays fixed after the first collective."""
    current = {"index": 0}
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with torch.device("meta"):  # nothing may be allocated on the default device
        comm = ProcessGroupCommunicator()
    assert comm.device == torch.device("cuda", 0)
    current["index"] = 1  # torch.cuda.set_device(1), after the optimizer was built
    assert comm.device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"on cpu, but this communicator's collectives \(nccl\)"):
        comm.broadcast(torch.zeros(2), src=0)  # the first collective fixes the device
    current["index"] = 0
    assert comm.device == torch.device("cuda", 1)


def test_launcher_local_rank_names_the_gpu_when_nothing_is_current(one_rank_group, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert ProcessGroupCommunicator().device == torch.device("cuda", 5)


def test_gloo_communicator_is_on_the_cpu(one_rank_group):
    comm = ProcessGroupCommunicator()
    assert comm.device == torch.device("cpu")
    comm.broadcast(torch.zeros(2), src=0).wait()


@pytest.mark.parametrize(
    ("device", "local_rank", "expected"),
    [("cuda", 3, torch.device("cuda", 3)), ("cuda:1", 3, torch.device("cuda", 1))],
)
def test_nccl_process_group_gets_device_id(device, local_rank, expected):
    options = process_group_options("nccl", device, local_rank)
    assert options["device_id"] == expected
    assert options["timeout"] == datetime.timedelta(minutes=30)


def test_gloo_process_group_gets_no_device_id():
    assert "device_id" not in process_group_options("gloo", "cpu", 0)


def test_nccl_without_a_gpu_device_is_refused():
    with pytest.raises(ValueError, match="nccl backend needs a CUDA device, got cpu"):
        process_group_options("nccl", "cpu", 0)


def test_torch_init_process_group_accepts_device_id():
    import inspect  # noqa: PLC0415

    assert "device_id" in inspect.signature(dist.init_process_group).parameters


def test_init_distributed_passes_the_options(monkeypatch):
    """``init_distributed`` on a GPU rank hands ``init_process_group`` the nccl ``device_id``
    (set_device and the group faked: no GPU here)."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(launch, "_parent_command_line", lambda: [])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("set", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def fake_init(backend, **options):
        seen.update(backend=backend, **options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        launch.init_distributed(2, torch.device("cuda", 1))
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["set"] == torch.device("cuda", 1)
