"""Start N CPU ranks (fork, gloo over a file:// rendezvous) and run one function on each.

Forking keeps the parent's imports, so a launch costs well under a second; every scenario of a
world size runs inside ONE launch to keep the suite fast.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
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
    run_ranks_within(math.inf, world_size, fn, *args)


def run_ranks_within(seconds: float, world_size: int, fn: Callable, *args: object) -> None:
    """:func:`run_ranks` that stops every rank and raises TimeoutError after ``seconds``.

    For scenarios that may fail on one rank only: the other rank would then wait forever in a
    collective its peer never joins.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        context = mp.start_processes(
            _worker,
            args=(world_size, init_file, fn, args),
            nprocs=world_size,
            join=False,
            start_method="fork",
        )
        deadline = time.monotonic() + seconds
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world_size} ranks still running after {seconds} s")


class StrictDeviceCommunicator:
    """A ProcessGroupCommunicator that refuses, like NCCL, any tensor not on its own device.

    Over gloo its device is the CPU; a collective handed a tensor elsewhere (``meta`` under a
    meta default device) raises at once instead of reaching the process group.
    """

    def __init__(self) -> None:
        from gnlorp_dist.distributed import ProcessGroupCommunicator  # noqa: PLC0415

        self.inner = ProcessGroupCommunicator()
        self.rank, self.world_size = self.inner.rank, self.inner.world_size
        self.device = self.inner.device
        self.collectives = 0

    def _check(self, tensor: torch.Tensor, op: str) -> None:
        if tensor.device != self.device:
            raise RuntimeError(
                f"{op}: tensor on {tensor.device}, this communicator takes {self.device} only"
            )
        self.collectives += 1

    def broadcast(self, tensor: torch.Tensor, src: int):
        self._check(tensor, "broadcast")
        return self.inner.broadcast(tensor, src)

    def all_reduce_sum(self, tensor: torch.Tensor):
        self._check(tensor, "all_reduce_sum")
        return self.inner.all_reduce_sum(tensor)

    def reduce_sum(self, tensor: torch.Tensor, dst: int):
        self._check(tensor, "reduce_sum")
        return self.inner.reduce_sum(tensor, dst)

    def all_to_all(self, output, input, output_splits, input_splits):
        self._check(input, "all_to_all")
        self._check(output, "all_to_all")
        return self.inner.all_to_all(output, input, output_splits, input_splits)

    def all_gather_object(self, obj: object) -> list[object]:
        return self.inner.all_gather_object(obj)

    def all_ranks_arrive(self, tag: str, timeout_s: float) -> bool:
        return self.inner.all_ranks_arrive(tag, timeout_s)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    return model.module if isinstance(model, DistributedDataParallel) else model


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter of ``model`` (unwrapped from DDP), flattened into one vector."""
    return torch.cat([p.detach().reshape(-1) for p in unwrapped(model).parameters()])


def train_on_global_batches(
    model, optimizer, steps, global_batch, rank=0, world_size=1, on_step=None
) -> None:
    """One optimizer step per step of ``steps`` on this rank's slice of ``global_batch(step)``;
    ``on_step(step + 1)`` after each."""
    for step in steps:
        ids = global_batch(step).chunk(world_size)[rank]
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1)
