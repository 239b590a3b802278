"""A process group for ranks this program forked itself (the benchmarks' gloo ranks), through a
rendezvous file instead of a launcher's environment.

:func:`init_distributed` joins the job a launcher started (torchrun, accelerate, deepspeed,
mpirun); the benchmarks start their own ranks with ``torch.multiprocessing`` and meet through a
file in a temporary folder. These are the few ``torch.distributed`` calls they need, here because
this package is the only one that imports ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def join_file_group(
    rank: int,
    world_size: int,
    init_file: str,
    *,
    backend: str = "gloo",
    timeout: datetime.timedelta | None = None,
) -> None:
    """Join the ``world_size``-rank default process group that meets at ``init_file`` (every
    rank names the same path; the file must not exist before the first rank arrives).
    ``timeout``: how long a collective may wait (torch's default, 30 minutes, when None)."""
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size, **options
    )


def leave_process_group() -> None:
    """Destroy the default process group, if there is one (another may then be created)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def process_group_is_up() -> bool:
    """Whether this process is in a default process group."""
    return dist.is_initialized()


def barrier() -> None:
    """Wait for every rank of the default process group (nothing to wait for without one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def end_forked_rank() -> NoReturn:
    """End a rank this program forked, once its result is on disk: leave the process at once,
    without tearing the gloo group down.

    torch 2.13's gloo teardown can deadlock: the group's destructor, run with the GIL held (by
    the last reference going away, e.g. DDP's reducer freed with the rank function's frame),
    waits for the group's work-queue mutex, while gloo's worker thread, holding that mutex,
    waits for the GIL to free a finished asynchronous broadcast's tensor. benchmarks.distributed
    hung that way at 4 ranks on 2 busy cores (native stacks: ``~ProcessGroupGloo`` ->
    ``pthread_mutex_lock`` beside ``~AsyncBroadcastWork`` -> ``take_gil``). A forked rank has
    nothing left to clean up once its result is written (the parent owns the folder), so it
    skips the teardown; every collective it started has completed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
