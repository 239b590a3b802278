"""What one param group's ``step()`` is on this rank: :class:`GroupStep` and its questions.

The phases of :mod:`gnlorp_dist.optim.driver` ask a ``GroupStep`` where each matrix's low-rank
work happens (its :class:`Placement`, an object chosen once from the layout:
:mod:`gnlorp_dist.optim.placements`), what it is projected in (its projected shape, side and
basis: the group's :class:`~gnlorp_dist.optim.spec.ProjectionSpec`) and who owns it; the answers
live here so the driver reads as its phases only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import Communicator
from gnlorp_dist.optim.fragments import Fragment, ModelParameter
from gnlorp_dist.optim.layouts import Layout
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.projection import Side, low_rank_shape
from gnlorp_dist.optim.projector import check_random_basis_device, regenerate_basis
from gnlorp_dist.optim.quantized import SharedBlock, stores_8bit
from gnlorp_dist.optim.quantized_basis import load_basis
from gnlorp_dist.optim.spec import GroupSpec, ProjectionSpec, StepHyperparameters

ReceivedDirection = Callable[[], tuple[Tensor, tuple[Tensor, Tensor] | None]]
"""Called once a direction's broadcast has arrived: the direction and, under ProjFactor, the
row and column sums that travelled with it."""


class Placement(Protocol):
    """Where a projected matrix's low-rank work happens on the ranks, as phase methods (the
    three placements are :mod:`gnlorp_dist.optim.placements`)."""

    batched: bool
    """Its matrices' collectives are started together for the whole group (their handles
    overlap); else the phases run matrix by matrix, so one low-rank workspace is alive."""
    cuts_moment_blocks: bool
    """Each rank keeps the moments of its own rows: 8-bit blocks may be cut between ranks."""

    def basis_home(self, step: GroupStep, index: int) -> tuple[torch.dtype, torch.device]:
        """The dtype and device the matrix's basis is used in on this rank."""
        ...

    def low_rank_gradient(
        self, step: GroupStep, index: int, partial: Tensor | None, exchange: OwnerExchange
    ) -> Tensor | None:
        """Form (and start sending, through ``exchange``) the low-rank gradient; the tensor this
        rank keeps the moments of once ``exchange`` is waited for, else None. ``partial``: this rank's
        contribution already projected (per-layer mode's micro-batch sum)."""
        ...

    def mean_over_ranks(self, step: GroupStep, low: Tensor) -> Tensor:
        """The low-rank gradient Adam consumes, from what :meth:`low_rank_gradient` kept."""
        ...

    def moment_offset(self, step: GroupStep, index: int) -> int:
        """Where this rank's moments start in the matrix's whole low-rank moments."""
        ...

    def share_direction(
        self,
        step: GroupStep,
        index: int,
        direction: Tensor | None,
        exchange: OwnerExchange,
    ) -> ReceivedDirection | None:
        """Start sending the normalised direction to the ranks that apply it, through
        ``exchange`` (None: the rank that computed it applies it alone)."""
        ...

    def update_target(
        self, step: GroupStep, index: int, direction: Tensor, proj: Tensor
    ) -> tuple[Tensor, Tensor, int, int]:
        """``(weights, back-projected update, start, numel)``: the weights this rank updates,
        the update of the same shape, and where they sit in the matrix's flat elements."""
        ...


@dataclass(kw_only=True)
class GroupStep:
    """One param group as one ``step()`` sees it on this rank."""

    group: dict[str, Any]
    """The group dict (only where a record is kept with it: the random bases' device)."""
    spec: GroupSpec
    """The group's spec (projection and moments), parsed when the group was added."""
    hyper: StepHyperparameters
    """The group's lr, betas, eps and weight decay as this step reads them."""
    layout: Layout
    """Where this rank holds each parameter."""
    params: list[ModelParameter]
    """The group's parameters, with their true shapes and names."""
    fragments: list[Fragment | None]
    """This rank's run of each parameter (None: none of it, or no gradient)."""
    states: list[dict[str, Any] | None]
    """The optimizer state of each parameter on this rank (None: this rank keeps none)."""
    active: list[bool]
    """Whether each parameter takes part in this step (it has a gradient; the same answer on
    every rank)."""
    placements: list[Placement]
    """Where each matrix's low-rank work happens (projected groups; empty for dense ones)."""
    reduced: dict[int, Tensor] = field(default_factory=dict)
    """Low-rank gradients whose reduce to the owner already ran (started inside backward by
    :mod:`gnlorp_dist.optim.backward_reduction`): summed over the ranks, not yet averaged."""
    blocks: list[list[OwnedBlock]]
    """Each parameter's ownership blocks (a projected matrix: one, its owner)."""
    comm: Communicator
    """The ranks of the job."""
    device: torch.device
    """Where buffers that go through collectives live."""
    shared: dict[int, list[SharedBlock]] = field(default_factory=dict)
    """8-bit blocks this rank's runs share with other ranks', waiting for their agreed scales
    (:func:`settle_shared_blocks`)."""
    counted: dict[int, int] = field(default_factory=dict)
    """Each matrix's step count before this update's increment (:func:`adam_directions`): a
    random basis is the one of the window of the update being taken, also after the count."""
    random_bases: dict[int, Tensor] = field(default_factory=dict)
    """Random bases regenerated during this step (transient: never in the state)."""

    def __post_init__(self) -> None:
        if self.random and self.params:
            # Before any phase: a window begun on another device type is refused here.
            _dtype, device = self.placement(0).basis_home(self, 0)
            states = (state for state in self.states if state is not None)
            check_random_basis_device(self.projection, self.group, states, device.type, self.comm)

    @property
    def projected(self) -> bool:
        return self.spec.projection is not None

    @property
    def projection(self) -> ProjectionSpec:
        """The group's projection (a projected group's step only)."""
        assert self.spec.projection is not None, "a dense group has no projection"
        return self.spec.projection

    def owner(self, index: int) -> int:
        (block,) = self.blocks[index]
        return block.owner

    def side(self, index: int) -> Side:
        return self.projection.side(self.params[index].shape)

    @property
    def random(self) -> bool:
        """Random bases (VLoRP): regenerated from seeds, never stored, refreshed or sent."""
        return self.projected and self.projection.random

    @property
    def factored(self) -> bool:
        """ProjFactor's factored second moment (:mod:`gnlorp_dist.optim.projfactor`)."""
        return self.spec.moments.factored

    def proj_shape(self, index: int) -> tuple[int, int]:
        """The shape parameter ``index`` is projected in (``(M c, N / c)`` with granularity:
        the same flat indices, so runs of the matrix are runs of it)."""
        return self.projection.projected_shape(self.params[index].shape)

    @property
    def back_divisor(self) -> int:
        return self.projection.back_divisor

    @property
    def owner_alone(self) -> bool:
        """Replicated, averaged gradients: owners update and broadcast the weights."""
        return self.layout.replicated and self.layout.averaged

    def placement(self, index: int) -> Placement:
        return self.placements[index]

    def holds(self, index: int) -> bool:
        """Whether this rank updates (part of) parameter ``index``'s weights itself."""
        if self.owner_alone:  # the tensor itself, whole: its owner updates it
            return self.active[index] and any(b.owner == self.comm.rank for b in self.blocks[index])
        return self.fragments[index] is not None

    def wire_dtype(self, index: int) -> torch.dtype:
        """The dtype parameter ``index``'s low-rank traffic travels in: the weights' under the
        low-rank reduction (bf16 weights send bf16, as DDP all-reduces bf16 gradients; the
        owner sums and keeps the moments in float32), float32 between an engine's fp32 runs."""
        if self.layout.replicated and not self.layout.averaged:
            return self.params[index].tensor.dtype
        return torch.float32

    def state(self, index: int) -> dict[str, Any]:
        state = self.states[index]
        assert state is not None, f"{self.params[index].name}: no state on this rank"
        return state

    def basis(self, index: int) -> Tensor:
        """Parameter ``index``'s projection basis (restored from its codes under ``proj_bits``,
        in the dtype it was computed in: the gradient's on an owner, else float32).

        A quantised basis is restored at each use (projection and back-projection: twice a
        step), so no restored basis outlives its phase; memory, not the small dequantisation,
        is what ``proj_bits`` is for. A random basis is drawn on the device that uses it, once
        per step (per hook in per-layer mode), and kept for the step's phases only: holding it
        for its whole window would cost what a stored SVD basis does, which random bases exist
        to avoid; a draw is one RNG kernel, with no host work but seeding."""
        dtype, device = self.placement(index).basis_home(self, index)
        if not self.random:
            return load_basis(self.state(index), dtype)
        if index not in self.random_bases:
            (block, *_) = self.blocks[index]
            window = self.counted.get(index, int(self.state(index).get("step", 0)))
            self.random_bases[index] = regenerate_basis(
                self.projection,
                block.param_index,
                window,
                self.params[index].shape,
                dtype=dtype,
                device=device,
            )
        return self.random_bases[index]

    def moments_numel(self, index: int) -> int:
        """Elements of one Adam moment of the whole parameter ``index`` (low-rank if projected)."""
        if self.projected:
            shape = self.proj_shape(index)
            return math.prod(low_rank_shape(shape, self.projection.rank, self.side(index)))
        return math.prod(self.params[index].shape)

    def cut_8bit(self, index: int) -> bool:
        """Whether parameter ``index``'s 8-bit moments may be cut between ranks (the same answer
        on every rank): its blocks' scales are then agreed at the end of the step."""
        moments = self.spec.moments
        if self.comm.world_size == 1:
            return False
        if not stores_8bit(moments.bits, self.moments_numel(index), moments.min_8bit_size):
            return False
        if self.projected:
            return self.placement(index).cuts_moment_blocks
        return not self.layout.replicated or len(self.blocks[index]) > 1
