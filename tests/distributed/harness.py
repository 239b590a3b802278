"""Start N CPU ranks (fork, gloo over a file:// rendezvous) and run one function on each.

Forking keeps the parent's imports, so a launch costs well under a second; every scenario of a
world size runs inside ONE launch to keep the suite fast.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable, *args: object) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked ranks; raise if any fails."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        context = mp.start_processes(
            _worker,
            args=(world_size, init_file, fn, args),
            nprocs=world_size,
            join=False,
            start_method="fork",
        )
        while not context.join(timeout=300):
            pass
