"""Matrices held in flat fragments: the math of projecting them, and how engines expose them.

Engines that shard parameters (DeepSpeed ZeRO 1/2/3) hand an optimizer flat 1-D partitions in
place of its parameters. Each rank then holds, of every model matrix ``W`` (``M x N``, row-major),
at most one contiguous run of elements ``[start, start + numel)`` of ``W.flatten()``: a
:class:`Fragment`. A run may begin and end inside a row.

The projected update still needs only small things across ranks, because projection is linear
and works row by row (``proj`` the basis, ``D`` the low-rank Adam direction):

- right side: ``low_Mr = G P^T`` row by row; a rank computes the rows its run covers (a partial
  row contributes a partial sum) and the owner sums the contributions; back-projection
  ``(D P)[rows]`` needs only the rows the run covers;
- left side: ``low_rN = P^T G = sum over rows i of P[i]^T G[i]``: the same partial sums over the
  covered rows; back-projection is ``P[rows] @ D``.

So a rank holding a run never needs the whole gradient except at a subspace refresh. The
functions here are pure; :mod:`gnlorp_dist.optim.driver` runs them across ranks and the
engine integrations tell the optimizer where the runs are (a
:class:`~gnlorp_dist.optim.layouts.Layout`, registered with
:func:`~gnlorp_dist.optim.layouts.use_engine_layouts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gnlorp_dist.optim.projection import Side


@dataclass(frozen=True, kw_only=True)
class Fragment:
    """This rank's run of one model parameter's elements, as the engine stores them."""

    start: int
    """First element of the run in the row-major flattened parameter."""
    numel: int
    """Number of elements in the run (> 0)."""
    grad: Tensor
    """The run's averaged gradient, 1-D, float32."""
    master: Tensor
    """The run's float32 master weights, 1-D; updated in place."""
    write_back: Callable[[], None] | None = None
    """Called after ``master`` was updated, when ``master`` is a copy of the engine's tensor."""


@dataclass(frozen=True, kw_only=True)
class ModelParameter:
    """A parameter as the model sees it: its true shape, even when the engine flattened it."""

    tensor: Tensor
    """The module's parameter object (possibly emptied by the engine)."""
    shape: tuple[int, ...]
    """Its true shape."""
    name: str
    """Its name in the optimizer (``param_names`` or ``param_groups[g][i]``)."""


def covering_rows(start: int, numel: int, cols: int) -> tuple[int, int]:
    """``(first, stop)``: the rows of a ``cols``-wide matrix that elements ``[start, +numel)`` touch."""
    assert numel > 0 and cols > 0
    return start // cols, (start + numel - 1) // cols + 1


def rows_block(values: Tensor, start: int, numel: int, cols: int) -> Tensor:
    """The covered rows of the run ``values``, zeros outside the run: ``(stop - first, cols)``."""
    first, stop = covering_rows(start, numel, cols)
    block = torch.zeros((stop - first) * cols, dtype=values.dtype, device=values.device)
    offset = start - first * cols
    block[offset : offset + numel] = values[:numel]
    return block.view(stop - first, cols)


def run_of_rows(block: Tensor, start: int, numel: int) -> Tensor:
    """The run ``[start, +numel)`` out of the block of its covered rows (inverse of rows_block)."""
    cols = block.shape[1]
    first, _ = covering_rows(start, numel, cols)
    offset = start - first * cols
    return block.reshape(-1)[offset : offset + numel]


def project_fragment(
    fragment_values: Tensor,
    start: int,
    numel: int,
    shape: tuple[int, int],
    proj: Tensor,
    side: Side,
    out: Tensor,
) -> None:
    """Add the run's share of ``project(G, proj, side)`` to ``out`` (the low-rank shape)."""
    rows, cols = shape
    first, stop = covering_rows(start, numel, cols)
    assert stop <= rows
    block = rows_block(fragment_values, start, numel, cols).to(proj.dtype)
    if side == "right":
        out[first:stop] += block @ proj.T
    else:
        out += proj[first:stop].T @ block


def back_project_fragment(
    direction_low: Tensor,
    start: int,
    numel: int,
    shape: tuple[int, int],
    proj: Tensor,
    side: Side,
) -> Tensor:
    """The run's elements of ``project_back(direction_low, proj, side)``, 1-D."""
    _rows, cols = shape
    first, stop = covering_rows(start, numel, cols)
    if side == "right":
        block = direction_low[first:stop] @ proj
    else:
        block = proj[first:stop] @ direction_low
    return run_of_rows(block, start, numel)
