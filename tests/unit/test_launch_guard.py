"""Launches that would train unsynchronised are refused (pure checks on command lines)."""

from __future__ import annotations

import pytest

from gnlorp_dist.distributed.launch import check_world_size, requested_processes

ACCELERATE_CPU = [
    "/venv/bin/python",
    "/venv/bin/accelerate",
    "launch",
    "--cpu",
    "--num_processes",
    "2",
    "train.py",
]


@pytest.mark.parametrize(
    ("argv", "asked"),
    [
        (ACCELERATE_CPU, 2),
        (["accelerate", "launch", "--num_processes=4", "x.py"], 4),
        (["/venv/bin/torchrun", "--nproc_per_node", "3", "x.py"], 3),
        (["python", "-m", "torch.distributed.run", "--nproc-per-node=2", "x.py"], 2),
        (["deepspeed", "--num_gpus", "2", "x.py"], 2),
        (["bash", "-c", "python x.py"], None),
        (["python", "x.py", "--num_processes", "2"], None),
    ],
)
def test_requested_processes(argv, asked):
    assert requested_processes(argv) == asked


def test_accelerate_cpu_single_process_is_refused():
    with pytest.raises(ValueError, match="asked for 2 processes .* runs alone"):
        check_world_size(1, None, ACCELERATE_CPU)


def test_expected_world_size_mismatch_is_refused():
    with pytest.raises(
        ValueError, match="--world-size 2 was asked for but this job has WORLD_SIZE=1"
    ):
        check_world_size(1, 2, [])


def test_consistent_launches_pass():
    check_world_size(2, 2, ["torchrun", "--nproc_per_node", "2", "x.py"])
    check_world_size(1, None, ["bash"])
    check_world_size(1, 1, ["accelerate", "launch", "--num_processes", "1", "x.py"])
