"""What the optimizer needs from a process group, and the one-process implementation.

The optimizer talks to other ranks only through a :class:`Communicator`. On one process it is a
:class:`LocalCommunicator`, whose operations do nothing, so one process runs the same code path
as many with the communication skipped. The real implementation over ``torch.distributed`` lives
in :mod:`gnlorp_dist.distributed` (the only package that imports it).
"""

from __future__ import annotations

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
