"""Where a projected matrix's low-rank work happens: the three placements, as objects.

A layout (:mod:`gnlorp_dist.optim.layouts`) answers two questions: is every parameter whole and
averaged on every rank, and do runs cover whole rows? With the matrix's projection side those
answers pick its placement once (:func:`choose_placement`); the driver's phases then call the
placement's methods and never ask which one it is:

- :data:`OWNER` (replicated layouts, averaged gradients): the owner holds the whole gradient
  (the parameter's own ``.grad``: no view of it is kept, so per-layer mode can free it
  mid-step); it alone projects, keeps the moments and updates the weights, which the caller
  then broadcasts (:func:`~gnlorp_dist.optim.driver.broadcast_updated`);
- :data:`REDUCE` (runs cut anywhere, or left-projected matrices, whose low-rank gradient
  ``P^T G`` sums over every row, or data parallelism with each rank's own gradient, the
  low-rank reduction): each rank projects its run (or its whole gradient), the partial sums are
  reduced to the owner (averaged there when the gradients were each rank's own), which alone
  keeps the moments and broadcasts the normalised direction; every rank back-projects it onto
  its own run;
- :data:`ROWS` (right-projected matrices in row-aligned runs, FSDP2): ``G P^T`` row by row needs
  nothing from other ranks, so each rank keeps the moments of its rows and updates them alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gnlorp_dist.optim import projfactor
from gnlorp_dist.optim.fragments import (
    ModelParameter,
    back_project_fragment,
    covering_rows,
    project_fragment,
)
from gnlorp_dist.optim.group_step import GroupStep, Placement, ReceivedDirection
from gnlorp_dist.optim.layouts import Layout
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.projection import Side, low_rank_shape, project, project_back
from gnlorp_dist.optim.spec import ProjectionSpec


class _Local:
    """What the placements that keep their matrices' work on one rank share."""

    batched = False
    cuts_moment_blocks = False

    def basis_home(self, step: GroupStep, index: int) -> tuple[torch.dtype, torch.device]:
        return torch.float32, step.device

    def mean_over_ranks(self, step: GroupStep, low: Tensor) -> Tensor:
        return low

    def moment_offset(self, step: GroupStep, index: int) -> int:
        return 0

    def share_direction(
        self,
        step: GroupStep,
        index: int,
        direction: Tensor | None,
        exchange: OwnerExchange,
    ) -> ReceivedDirection | None:
        return None  # the rank that computed the direction applies it


class OwnerPlacement(_Local):
    """The owner does all of a matrix's work on its own ``.grad`` and weights."""

    def basis_home(self, step: GroupStep, index: int) -> tuple[torch.dtype, torch.device]:
        tensor = step.params[index].tensor
        return tensor.dtype, tensor.device  # computed from the gradient itself

    def low_rank_gradient(
        self, step: GroupStep, index: int, partial: Tensor | None, exchange: OwnerExchange
    ) -> Tensor | None:
        if not step.holds(index):
            return None
        grad = step.params[index].tensor.grad
        assert grad is not None
        return project(grad.reshape(step.proj_shape(index)), step.basis(index), step.side(index))

    def update_target(
        self, step: GroupStep, index: int, direction: Tensor, proj: Tensor
    ) -> tuple[Tensor, Tensor, int, int]:
        param = step.params[index]
        update = project_back(direction, proj, step.side(index)).view(param.shape)
        return param.tensor.data, update, 0, math.prod(step.proj_shape(index))


class RowsPlacement(_Local):
    """Each rank projects, keeps the moments of and updates its own rows."""

    cuts_moment_blocks = True

    def low_rank_gradient(
        self, step: GroupStep, index: int, partial: Tensor | None, exchange: OwnerExchange
    ) -> Tensor | None:
        fragment = step.fragments[index]
        if fragment is None:
            return None
        cols = step.proj_shape(index)[1]
        first, stop = covering_rows(fragment.start, fragment.numel, cols)
        grad_rows = fragment.grad[: fragment.numel].view(stop - first, cols)
        proj = step.basis(index)
        return grad_rows.to(proj.dtype) @ proj.T

    def moment_offset(self, step: GroupStep, index: int) -> int:
        fragment = step.fragments[index]
        assert fragment is not None
        first = covering_rows(fragment.start, fragment.numel, step.proj_shape(index)[1])[0]
        return first * step.projection.rank  # this rank's rows of the (M x r) moments

    def update_target(
        self, step: GroupStep, index: int, direction: Tensor, proj: Tensor
    ) -> tuple[Tensor, Tensor, int, int]:
        fragment = step.fragments[index]
        assert fragment is not None
        update = (direction @ proj).reshape(-1)
        return fragment.master[: fragment.numel], update, 0, math.prod(step.proj_shape(index))


class ReducePlacement:
    """Partial low-rank sums reduced to the owner; its direction broadcast to every rank."""

    batched = True
    cuts_moment_blocks = False

    def basis_home(self, step: GroupStep, index: int) -> tuple[torch.dtype, torch.device]:
        return torch.float32, step.device  # assembled from several ranks

    def low_rank_gradient(
        self, step: GroupStep, index: int, partial: Tensor | None, exchange: OwnerExchange
    ) -> Tensor | None:
        owned = step.owner(index) == step.comm.rank
        if index in step.reduced:  # its reduce ran inside backward
            return step.reduced[index].float() if owned else None
        if partial is not None:
            low = partial.to(step.device, step.wire_dtype(index)).contiguous()
        else:
            low = self._project_run(step, index)
        exchange.reduce_sum(low, dst=step.owner(index))
        return low if owned else None

    @staticmethod
    def _project_run(step: GroupStep, index: int) -> Tensor:
        """This rank's partial low-rank sum from its run (zeros without one)."""
        fragment, shape, side = step.fragments[index], step.proj_shape(index), step.side(index)
        if fragment is not None and fragment.numel == math.prod(shape):
            # The whole matrix (data parallel): project it at once, no row bookkeeping.
            proj = step.basis(index)
            grad = fragment.grad.view(shape).to(step.device, proj.dtype)
            return project(grad, proj, side).to(step.wire_dtype(index)).contiguous()
        low = torch.zeros(low_rank_shape(shape, step.projection.rank, side), device=step.device)
        if fragment is not None:
            grad = fragment.grad[: fragment.numel].to(step.device)
            proj = step.basis(index)
            project_fragment(grad, fragment.start, fragment.numel, shape, proj, side, low)
        return low

    def mean_over_ranks(self, step: GroupStep, low: Tensor) -> Tensor:
        if step.layout.averaged:
            return low
        # The ranks' own gradients summed: their mean, as one process. Float32 moments
        # whatever travelled (bf16 weights send bf16).
        return low.float().div_(step.comm.world_size)

    def moment_offset(self, step: GroupStep, index: int) -> int:
        return 0

    def share_direction(
        self,
        step: GroupStep,
        index: int,
        direction: Tensor | None,
        exchange: OwnerExchange,
    ) -> ReceivedDirection | None:
        owner = step.owner(index)
        sends = owner == step.comm.rank
        low_shape = low_rank_shape(step.proj_shape(index), step.projection.rank, step.side(index))
        shape = step.params[index].shape
        if step.factored:  # the first moment and the row/column sums, float32, in one packet
            if sends:
                assert direction is not None
                packet = projfactor.pack(direction.to(step.device), step.state(index))
            else:
                numel = projfactor.packet_numel(low_shape, shape)
                packet = torch.empty(numel, dtype=torch.float32, device=step.device)
            arrived = exchange.broadcast(packet, src=owner)

            def unpacked() -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
                if arrived is not None:
                    arrived.wait()  # its bucket (a no-op once the exchange was waited for)
                moment, row, col = projfactor.unpack(packet, low_shape, shape)
                return moment, (row, col)

            return unpacked
        wire = step.wire_dtype(index)
        if sends:
            assert direction is not None
            buffer = direction.to(step.device, wire).contiguous()
        else:
            buffer = torch.empty(low_shape, dtype=wire, device=step.device)
        arrived = exchange.broadcast(buffer, src=owner)

        def received() -> tuple[Tensor, None]:
            if arrived is not None:
                arrived.wait()  # its bucket (a no-op once the exchange was waited for)
            return buffer, None

        return received

    def update_target(
        self, step: GroupStep, index: int, direction: Tensor, proj: Tensor
    ) -> tuple[Tensor, Tensor, int, int]:
        fragment, shape, side = step.fragments[index], step.proj_shape(index), step.side(index)
        assert fragment is not None
        true_shape = step.params[index].shape
        if fragment.numel == math.prod(shape):  # the whole matrix (data parallel)
            update = project_back(direction, proj, side).view(true_shape)
            return fragment.master.view(true_shape), update, 0, math.prod(shape)
        start, numel = fragment.start, fragment.numel
        update = back_project_fragment(direction, start, numel, shape, proj, side)
        return fragment.master[:numel], update, start, numel


OWNER: Placement = OwnerPlacement()
REDUCE: Placement = ReducePlacement()
ROWS: Placement = RowsPlacement()


def choose_placement(layout: Layout, side: Side) -> Placement:
    """THE choice of a matrix's placement, from its group's layout and its projection side."""
    if layout.replicated:
        return OWNER if layout.averaged else REDUCE
    if layout.row_aligned and side == "right":
        return ROWS
    return REDUCE


def place(
    layout: Layout, projection: ProjectionSpec | None, params: list[ModelParameter]
) -> list[Placement]:
    """The placement of each matrix of a group (none for a dense group)."""
    if projection is None:
        return []
    return [choose_placement(layout, projection.side(param.shape)) for param in params]
