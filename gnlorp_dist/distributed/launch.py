"""Joining the job a launcher started, and refusing launches that would run unsynchronised.

torchrun, ``accelerate launch --multi_gpu`` and the ``deepspeed`` launcher export RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT, ``mpirun`` its own variables, read through mpi4py;
:func:`init_distributed` joins that group. Two launches fail silently elsewhere, and are refused here:

- ``accelerate launch --cpu --num_processes N`` starts ONE process with no WORLD_SIZE;
- any launcher asked for N processes whose children see another WORLD_SIZE.

The launcher's request is read from the parent process's command line (Linux ``/proc``), and a
``--world-size N`` given to ``gnlorp-train`` is checked the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist.distributed.communicator import ProcessGroupCommunicator, broadcast_parameters

_PROCESS_FLAGS = {
    "accelerate": ("--num_processes", "--num-processes"),
    "torchrun": ("--nproc_per_node", "--nproc-per-node"),
    "torch.distributed.run": ("--nproc_per_node", "--nproc-per-node"),
    "deepspeed": ("--num_gpus", "--num_accelerators"),
}


@dataclass(frozen=True, kw_only=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int
    """Global rank (0 on one process)."""
    world_size: int
    """Number of processes in the job (1 on one process)."""
    local_rank: int
    """Rank on this machine (picks the GPU)."""
    communicator: ProcessGroupCommunicator | None
    """The optimizer's communicator; None on one process."""
    device: torch.device = torch.device("cpu")
    """Where this process computes (its GPU, or the CPU); NCCL groups live on GPUs only."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, communicator=None)


def wrap_for_data_parallel(
    model: torch.nn.Module, context: DistributedContext, grad_reduction: str
) -> torch.nn.Module:
    """The module the training loop calls: DDP-wrapped (``none``: the optimizer reduces
    nothing), or ``model`` itself with rank 0's weights copied everywhere (``full``,
    ``low_rank``: the optimizer reduces gradients itself)."""
    if context.world_size == 1:
        return model
    assert context.communicator is not None
    if grad_reduction == "none":
        # DDP puts its buckets where the module is: the module must be on the device already.
        device = next(model.parameters()).device
        assert device == context.device, (device, context.device)
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    broadcast_parameters(model, context.communicator)
    return model


def requested_processes(argv: list[str]) -> int | None:
    """Processes per node a launcher command line asks for, or None if it is not a launcher."""
    joined = " ".join(argv)
    for launcher, flags in _PROCESS_FLAGS.items():
        if launcher not in joined:
            continue
        for index, word in enumerate(argv):
            for flag in flags:
                if word == flag and index + 1 < len(argv):
                    return _as_int(argv[index + 1])
                if word.startswith(flag + "="):
                    return _as_int(word.split("=", 1)[1])
    return None


def _as_int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _parent_command_line() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def check_world_size(world_size: int, expected: int | None, parent_argv: list[str]) -> None:
    """Raise ValueError if the job's size differs from what the user or the launcher asked."""
    if expected is not None and expected != world_size:
        raise ValueError(
            f"--world-size {expected} was asked for but this job has WORLD_SIZE={world_size}; "
            "the launcher did not start the processes you expected (on CPU use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            "`torchrun --nproc_per_node N`)"
        )
    asked = requested_processes(parent_argv)
    if asked is not None and asked > 1 and world_size == 1:
        raise ValueError(
            f"the launcher was asked for {asked} processes ({' '.join(parent_argv[:6])} ...) but "
            "this process runs alone (no WORLD_SIZE): training would not be synchronised. "
            "`accelerate launch --cpu` starts one process; on CPU use `ACCELERATE_USE_CPU=1 "
            f"accelerate launch --multi_gpu --num_processes {asked}` or `torchrun "
            f"--nproc_per_node {asked}`."
        )


MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
DEFAULT_MASTER_PORT = "29500"


def discover_mpi_environment() -> bool:
    """Under ``mpirun`` (no torch launcher variables), set RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT from MPI itself (mpi4py); True if it did.

    MASTER_ADDR defaults to rank 0's host address, sent to every rank over MPI, and MASTER_PORT
    to 29500; values already in the environment (``mpirun -x MASTER_ADDR``) win.
    """
    if "WORLD_SIZE" in os.environ or not any(v in os.environ for v in MPI_SIZE_VARIABLES):
        return False
    try:
        from mpi4py import MPI  # noqa: PLC0415  (only under mpirun)
    except ImportError as err:
        raise ValueError(
            "this process was started by mpirun but mpi4py is not installed: pip install "
            "'gnlorp-dist[mpi]' (mpi4py), or launch with torchrun / deepspeed"
        ) from err
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    address = None
    if "MASTER_ADDR" not in os.environ and world.Get_rank() == 0:
        address = socket.gethostbyname(socket.getfqdn())
    address = world.bcast(address, root=0)
    os.environ["RANK"] = str(world.Get_rank())
    os.environ["WORLD_SIZE"] = str(world.Get_size())
    os.environ["LOCAL_RANK"] = str(local.Get_rank())
    os.environ.setdefault("MASTER_ADDR", address or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    local.Free()
    return True


PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def process_group_options(
    backend: str, device: torch.device | str, local_rank: int
) -> dict[str, object]:
    """Keyword arguments for ``init_process_group(backend, ...)`` on a rank computing on
    ``device`` (``cuda`` without an index: ``LOCAL_RANK``'s GPU). NCCL gets ``device_id``
    (torch >= 2.3): its communicator then forms at once on that GPU, not lazily on whichever
    device is current at the first collective, and a bad GPU fails here, not mid-step."""
    options: dict[str, object] = {"timeout": PROCESS_GROUP_TIMEOUT}
    if backend == "nccl":
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the nccl backend needs a CUDA device, got {device}")
        index = local_rank if device.index is None else device.index
        options["device_id"] = torch.device("cuda", index)
    return options


def init_distributed(
    expected_world_size: int | None = None, device: torch.device | str = "cpu"
) -> DistributedContext:
    """Join the launcher's process group or run alone, computing on ``device``.

    The backend follows the device: nccl when this process computes on a GPU (made current
    first, so NCCL's communicator lands on it and not on GPU 0), gloo on the CPU. torchrun,
    accelerate and the deepspeed launcher export the job's variables; under mpirun they are
    discovered through MPI (:func:`discover_mpi_environment`)."""
    device = torch.device(device)
    discover_mpi_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_world_size(world_size, expected_world_size, _parent_command_line())
    if world_size == 1:
        return dataclasses.replace(SINGLE_PROCESS, device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, **process_group_options(backend, device, local_rank))
    elif dist.get_backend() != backend:
        raise ValueError(
            f"the process group is {dist.get_backend()}, but this run computes on {device} "
            f"(which needs {backend}); use --device {'cpu' if backend == 'gloo' else 'cuda'} "
            "or let the launcher create the group"
        )
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        communicator=ProcessGroupCommunicator(),
        device=device,
    )
