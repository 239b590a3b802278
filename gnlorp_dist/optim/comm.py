"""What the optimizer needs from a process group, and the one-process implementation.

The optimizer talks to other ranks only through a :class:`Communicator`. On one process it is a
:class:`LocalCommunicator`, whose operations do nothing, so one process runs the same code path
as many with the communication skipped. The real implementation over ``torch.distributed`` lives
in :mod:`gnlorp_dist.distributed` (the only package that imports it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from torch import Tensor


class Handle(Protocol):
    """An in-flight collective; ``wait()`` blocks until it completed."""

    def wait(self) -> None: ...


class Communicator(Protocol):
    """The collectives the optimizer uses, all in place and asynchronous."""

    rank: int
    world_size: int

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
    """One process: every collective is the identity and returns no handle."""

    rank = 0
    world_size = 1
    device = "cpu"

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
