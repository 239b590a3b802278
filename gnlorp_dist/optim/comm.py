"""What the optimizer needs from a process group, and the one-process implementation.

The optimizer talks to other ranks only through a :class:`Communicator`. On one process it is a
:class:`LocalCommunicator`, whose operations do nothing, so one process runs the same code path
as many with the communication skipped. The real implementation over ``torch.distributed`` lives
in :mod:`gnlorp_dist.distributed` (the only package that imports it).

The device rule: a tensor handed to a collective is on the communicator's ``device`` (NCCL takes
tensors on this rank's GPU only, gloo CPU tensors). Buffers that travel are therefore allocated
on :func:`buffer_device`, never on the default device; a :class:`LocalCommunicator` has no
collectives and no device of its own, so its buffers follow the tensors they are computed from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor


class Handle(Protocol):
    """An in-flight collective; ``wait()`` blocks until it completed."""

    def wait(self) -> None: ...


class Communicator(Protocol):
    """The collectives the optimizer uses, all in place and asynchronous."""

    rank: int
    world_size: int
    device: torch.device | None
    """The device its collectives take tensors on (``cuda:<current>`` for NCCL, the CPU for
    gloo); None for a communicator without collectives (:class:`LocalCommunicator`), whose
    buffers stay on the device of the tensors they are computed from."""

    def broadcast(self, tensor: Tensor, src: int) -> Handle | None:
        """Start sending ``tensor`` from rank ``src`` to every rank (in place)."""
        ...

    def all_reduce_sum(self, tensor: Tensor) -> Handle | None:
        """Start summing ``tensor`` over every rank (in place)."""
        ...

    def reduce_sum(self, tensor: Tensor, dst: int) -> Handle | None:
        """Start summing ``tensor`` over every rank into rank ``dst``'s copy."""
        ...

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in rank order (blocking; small metadata only)."""
        ...


class LocalCommunicator:
    """One process: every collective is the identity and returns no handle.

    It has no device (``device`` is None): nothing travels, so the optimizer keeps every buffer
    on its parameters' device, whatever that is.
    """

    rank = 0
    world_size = 1
    device: torch.device | None = None

    def broadcast(self, tensor: Tensor, src: int) -> None:
        assert src == 0, src

    def all_reduce_sum(self, tensor: Tensor) -> None:
        return None

    def reduce_sum(self, tensor: Tensor, dst: int) -> None:
        assert dst == 0, dst

    def all_gather_object(self, obj: object) -> list[object]:
        return [obj]


def wait_all(handles: list[Handle | None]) -> None:
    for handle in handles:
        if handle is not None:
            handle.wait()


def buffer_device(comm: Communicator, like: torch.device) -> torch.device:
    """Where a buffer that goes through ``comm``'s collectives lives: the communicator's device,
    or ``like`` (the device of the tensors it is computed from) when it has none."""
    return like if comm.device is None else torch.device(comm.device)


def non_finite_on_any_rank(comm: Communicator, tensors: list[Tensor], like: torch.device) -> bool:
    """Whether any rank's ``tensors`` hold a NaN or an infinity.

    Counted on the tensors' device (no host sync per tensor), summed over ranks in one scalar
    all-reduce on ``comm``'s device, then read with ONE ``.item()``: the host sync that lets
    every rank raise together. ``like``: the device to use when this rank has no tensors.
    """
    device = buffer_device(comm, tensors[0].device if tensors else like)
    if tensors:
        first = tensors[0].device
        flags = torch.stack([torch.isfinite(t).logical_not().any().to(first) for t in tensors])
        verdict = flags.sum(dtype=torch.float32).reshape(1).to(device)
    else:
        verdict = torch.zeros(1, device=device)
    wait_all([comm.all_reduce_sum(verdict)])
    return verdict.item() > 0  # host sync (documented in GradNormLoRPAdamW)


_default_factory: Callable[[], Communicator | None] | None = None


def register_default_communicator(factory: Callable[[], Communicator | None]) -> None:
    """The communicator an optimizer built without one uses when the job has several ranks.

    ``gnlorp_dist.distributed`` registers one over the default ``torch.distributed`` group, so
    the plain ``GradNormLoRPAdamW(groups)`` that DeepSpeed, Accelerate and the Trainer build
    shards its state once the engine has initialised the process group.
    """
    global _default_factory
    _default_factory = factory


def default_communicator() -> Communicator | None:
    """A communicator for this process, or None if the job's ranks cannot be reached yet.

    One process (no ``WORLD_SIZE``, or 1) gets a :class:`LocalCommunicator`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LocalCommunicator()
    return _default_factory() if _default_factory is not None else None
