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

    def all_to_all(
        self, output: Tensor, input: Tensor, output_splits: list[int], input_splits: list[int]
    ) -> Handle | None:
        """Start sending piece ``r`` of ``input`` (``input_splits[r]`` elements, in order) to
        rank ``r``; piece ``r`` of ``output`` (``output_splits[r]`` elements) receives rank
        ``r``'s piece for this rank (``torch.distributed.all_to_all_single``). Both 1-D and
        contiguous. What :mod:`gnlorp_dist.optim.owner_exchange` sums onto owners with."""
        ...

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in rank order (blocking; small metadata only)."""
        ...

    def all_ranks_arrive(self, tag: str, timeout_s: float) -> bool:
        """Whether every rank reaches this call (same ``tag``, same call order) within
        ``timeout_s`` seconds. Never hangs: a rank that waits alone gets False, so a collective
        that only some ranks would join can be refused instead of entered."""
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

    def all_to_all(
        self, output: Tensor, input: Tensor, output_splits: list[int], input_splits: list[int]
    ) -> None:
        output.copy_(input)

    def all_gather_object(self, obj: object) -> list[object]:
        return [obj]

    def all_ranks_arrive(self, tag: str, timeout_s: float) -> bool:
        return True


def wait_all(handles: list[Handle | None]) -> None:
    for handle in handles:
        if handle is not None:
            handle.wait()


def buffer_device(comm: Communicator, like: torch.device) -> torch.device:
    """Where a buffer that goes through ``comm``'s collectives lives: the communicator's device,
    or ``like`` (the device of the tensors it is computed from) when it has none."""
    return like if comm.device is None else torch.device(comm.device)


def non_finite_count(tensors: list[Tensor]) -> Tensor:
    """How many of ``tensors`` are non-finite, as a 0-d float64 tensor on the first one's device.

    ONE fused reduction: ``torch._foreach_norm`` (one multi-tensor kernel on a GPU, vectorised
    loops on a CPU; several times faster there than ``isfinite`` per tensor), then one
    comparison of the stacked norms, with no host sync. A NaN or an infinity makes its tensor's
    L2 norm non-finite, and a finite tensor's norm is finite unless its squared norm overflows
    (above ~1e19 in float32, where Adam's second moment ``g * g`` would overflow as well): the
    count is the number of tensors the update could not use.
    """
    first = tensors[0].device if tensors else torch.device("cpu")
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=first)
    norms = torch._foreach_norm(tensors)
    stacked = torch.stack([n.to(first, torch.float32) for n in norms])
    return torch.isfinite(stacked).logical_not().sum(dtype=torch.float64)


def clip_coefficient(
    comm: Communicator, tensors: list[Tensor], max_norm: float, device: torch.device
) -> Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` of the global L2 norm of every rank's ``tensors``
    (``torch.nn.utils.clip_grad_norm_``'s coefficient), as a 0-d float32 tensor on ``device``:
    squared norms summed in float64 over ranks (one all-reduce), no host sync."""
    total = torch.zeros(1, dtype=torch.float64, device=device)
    if tensors:
        norms = torch._foreach_norm(tensors)
        total += torch.stack([n.to(device, torch.float64) for n in norms]).square().sum()
    wait_all([comm.all_reduce_sum(total)])
    coefficient = max_norm / (total.sqrt() + 1e-6)
    return coefficient.clamp(max=1.0).float().reshape(())


GRADIENTS_DIFFER_RTOL = 1e-9
"""Relative spread of the ranks' gradient checksums above which their gradients differ: DDP's
averaged gradients are bitwise equal on every rank, un-averaged ones differ by O(1)."""


def gradient_checksum(grads: list[Tensor], device: torch.device) -> Tensor:
    """Two float64 checksums of ``grads`` on ``device``: the sum and the sum of squares of the
    first row of each (the whole of a 1-D one). Rows, not whole tensors: one small gather per
    step tells averaged gradients (bitwise equal on every rank) from un-averaged ones."""
    if not grads:
        return torch.zeros(2, dtype=torch.float64, device=device)
    rows = torch.cat([(g[0] if g.dim() >= 2 else g).reshape(-1).to(device) for g in grads])
    rows = rows.double()
    return torch.stack([rows.sum(), rows.square().sum()])


def ranks_disagree(totals: list[float], totals_sq: list[float], world_size: int) -> bool:
    """Whether per-rank values, given by their sums and sums of squares over ranks, differ."""
    for total, total_sq in zip(totals, totals_sq):
        mean_sq = total_sq / world_size
        spread = mean_sq - (total / world_size) ** 2
        if spread > GRADIENTS_DIFFER_RTOL * mean_sq:
            return True
    return False


def step_verdict(
    comm: Communicator, due: list[Tensor], like: torch.device, checked: list[Tensor] | None
) -> tuple[bool, bool]:
    """``(any rank's ``due`` tensors are non-finite, the ranks' ``checked`` gradients differ)``.

    :func:`non_finite_count` of ``due`` on the tensors' device (no host sync per tensor), summed
    over ranks in ONE all-reduce on ``comm``'s device that also carries each rank's
    :func:`gradient_checksum` of ``checked`` and its square (so the sum over ranks gives their
    spread), then read with ONE host read: the sync that lets every rank skip or raise together
    before anything changes. ``checked`` None: no comparison (the second answer is False).
    """
    device = buffer_device(comm, due[0].device if due else like)
    verdict = torch.zeros(5, dtype=torch.float64, device=device)
    if due:
        verdict[0] = non_finite_count(due).to(device)
    if checked is not None:
        checksum = gradient_checksum(checked, device)
        verdict[1:3] = checksum
        verdict[3:5] = checksum.square()
    wait_all([comm.all_reduce_sum(verdict)])
    values = verdict.tolist()  # host sync (documented in GradNormLoRPAdamW)
    differ = checked is not None and ranks_disagree(values[1:3], values[3:5], comm.world_size)
    return values[0] > 0, differ


_job_communicator: Callable[[], Communicator | None] | None = None


def use_job_communicator(factory: Callable[[], Communicator | None]) -> None:
    """Set how an optimizer built without a communicator reaches the job's ranks.

    The package root (``gnlorp_dist/__init__.py``) sets the one over the default
    ``torch.distributed`` group (:mod:`gnlorp_dist.distributed`, a layer above this one), so the
    plain ``GradNormLoRPAdamW(groups)`` that DeepSpeed, Accelerate and the Trainer build shards
    its state once the engine has initialised the process group. It replaces, never appends.
    """
    global _job_communicator
    _job_communicator = factory


def default_communicator() -> Communicator | None:
    """A communicator for this process, or None if the job's ranks cannot be reached yet.

    A job whose process group is already up gets a communicator over it, whether or not the
    launcher set ``WORLD_SIZE`` (ranks forked by ``torch.multiprocessing`` and joined with
    ``init_process_group`` have no such variable: trusting it alone would silently keep the
    whole state on every rank). Otherwise one process (no ``WORLD_SIZE``, or 1) gets a
    :class:`LocalCommunicator`, and a job whose group is not up yet None.
    """
    if _job_communicator is not None:
        found = _job_communicator()
        if found is not None:
            return found
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LocalCommunicator()
    return None
