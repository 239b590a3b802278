"""What one param group's ``step()`` is on this rank: :class:`GroupStep` and its questions.

The phases of :mod:`gnlorp_dist.optim.driver` ask a ``GroupStep`` where each matrix's low-rank
work happens (its placement), what it is projected in (its projected shape, side and basis:
:mod:`gnlorp_dist.optim.projector`) and who owns it; the answers live here so the driver reads
as its phases only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import Communicator
from gnlorp_dist.optim.fragments import Fragment, ModelParameter
from gnlorp_dist.optim.layouts import Layout
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.projection import low_rank_shape
from gnlorp_dist.optim.projector import (
    back_divisor,
    check_random_basis_device,
    group_side,
    is_factored,
    is_random,
    projected_shape,
    regenerate_basis,
)
from gnlorp_dist.optim.quantized import MIN_8BIT_NUMEL, SharedBlock
from gnlorp_dist.optim.quantized_basis import load_basis

Placement = Literal["owner", "reduce", "rows"]


@dataclass(kw_only=True)
class GroupStep:
    """One param group as one ``step()`` sees it on this rank."""

    group: dict[str, Any]
    """The group dict (hyperparameters)."""
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
            owner = self.placement(0) == "owner"
            device = self.params[0].tensor.device if owner else self.device
            states = (state for state in self.states if state is not None)
            check_random_basis_device(self.group, states, device.type, self.comm)

    @property
    def projected(self) -> bool:
        return "rank" in self.group

    def owner(self, index: int) -> int:
        (block,) = self.blocks[index]
        return block.owner

    def side(self, index: int) -> Any:
        return group_side(self.params[index].shape, self.group)

    @property
    def random(self) -> bool:
        """Random bases (VLoRP): regenerated from seeds, never stored, refreshed or sent."""
        return is_random(self.group)

    @property
    def factored(self) -> bool:
        """ProjFactor's factored second moment (:mod:`gnlorp_dist.optim.projfactor`)."""
        return is_factored(self.group)

    def proj_shape(self, index: int) -> tuple[int, int]:
        """The shape parameter ``index`` is projected in (``(M c, N / c)`` with granularity:
        the same flat indices, so runs of the matrix are runs of it)."""
        return projected_shape(self.params[index].shape, self.group)

    @property
    def back_divisor(self) -> int:
        return back_divisor(self.group)

    @property
    def owner_alone(self) -> bool:
        """Replicated, averaged gradients: owners update and broadcast the weights."""
        return self.layout.replicated and self.layout.averaged

    def placement(self, index: int) -> Placement:
        if self.layout.replicated:
            return "owner" if self.layout.averaged else "reduce"
        if self.layout.row_aligned and self.side(index) == "right":
            return "rows"
        return "reduce"

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
        owner = self.placement(index) == "owner"
        dtype = self.params[index].tensor.dtype if owner else torch.float32
        if not self.random:
            return load_basis(self.state(index), dtype)
        if index not in self.random_bases:
            (block, *_) = self.blocks[index]
            window = self.counted.get(index, int(self.state(index).get("step", 0)))
            device = self.params[index].tensor.device if owner else self.device
            self.random_bases[index] = regenerate_basis(
                self.group,
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
            return math.prod(low_rank_shape(shape, self.group["rank"], self.side(index)))
        return math.prod(self.params[index].shape)

    def cut_8bit(self, index: int) -> bool:
        """Whether parameter ``index``'s 8-bit moments may be cut between ranks (the same answer
        on every rank): its blocks' scales are then agreed at the end of the step."""
        if self.group["bits"] != 8 or self.comm.world_size == 1:
            return False
        if self.moments_numel(index) < self.group.get("min_8bit_size", MIN_8BIT_NUMEL):
            return False
        if self.projected:
            return self.placement(index) == "rows"
        return not self.layout.replicated or len(self.blocks[index]) > 1
