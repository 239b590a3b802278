"""ProjFactor's second moment in the driver (``second_moment="factored"``): state and traffic.

The math is :mod:`gnlorp_dist.optim.vlorp`'s; this module says where it lives on the ranks. The first
moment stays in the subspace (the projected shape's ``M c x r``, 8-bit capable, in the
:class:`~gnlorp_dist.optim.quantized.MomentStore`); the second is the running row and column sums
``row_sq`` (M) and ``col_sq`` (N) of the squared back-projected gradient of the TRUE ``M x N``
shape, float32, kept where the moments are kept (the owner). They are computed from the
low-rank gradient (:func:`~gnlorp_dist.optim.vlorp.square_sums_low_rank`): no ``M x N`` gradient is
built. The update of element ``(i, j)`` is ``back(m)_ij / (sqrt(V^_ij / (1 - b2^t)) + eps)``
with ``V^ = row ⊗ col / sum(row)``, stepped by ``lr * scale / (1 - b1^t)``: Adam's bias
corrections, ``eps`` added after the square root of the corrected ``V^`` (Adam's convention, not
GaLore's ``sqrt(v) + eps`` before correction).

Under the reduce placement (:mod:`gnlorp_dist.optim.placements`) the owner broadcasts one
packet: the low-rank first moment, then the row and column sums (``M + N`` floats), float32;
each rank back-projects the moment onto its own run and divides by the denominator of the rows
its run covers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.fragments import covering_rows, run_of_rows
from gnlorp_dist.optim.spec import ProjectionSpec
from gnlorp_dist.optim.vlorp import (
    factored_denominator_rows,
    factored_second_moment_update,
    square_sums_low_rank,
)


def update_statistics(
    state: dict[str, Any],
    low: Tensor,
    proj: Tensor,
    projection: ProjectionSpec,
    shape: tuple[int, ...],
    beta2: float,
) -> None:
    """Fold this step's low-rank gradient ``low`` into ``state``'s row/column sums."""
    rows, cols = shape
    sums = square_sums_low_rank(low, proj, projection.granularity, shape, random=projection.random)
    row = state.get("row_sq")
    col = state.get("col_sq")
    if row is None or col is None:
        row = torch.zeros(rows, dtype=torch.float32, device=low.device)
        col = torch.zeros(cols, dtype=torch.float32, device=low.device)
    state["row_sq"], state["col_sq"] = factored_second_moment_update(row, col, sums, beta2)


def pack(direction: Tensor, state: dict[str, Any]) -> Tensor:
    """The owner's broadcast: the first moment, then the row and column sums (float32)."""
    parts = [direction.float().reshape(-1), state["row_sq"].float(), state["col_sq"].float()]
    return torch.cat([part.to(direction.device) for part in parts])


def packet_numel(low_shape: tuple[int, ...], shape: tuple[int, ...]) -> int:
    return math.prod(low_shape) + shape[0] + shape[1]


def unpack(
    packet: Tensor, low_shape: tuple[int, ...], shape: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(first moment, row_sq, col_sq)`` out of :func:`pack`'s packet."""
    numel = math.prod(low_shape)
    row_end = numel + shape[0]
    return packet[:numel].view(low_shape), packet[numel:row_end], packet[row_end:]


def divide_by_denominator(
    back_flat: Tensor,
    start: int,
    numel: int,
    shape: tuple[int, ...],
    statistics: tuple[Tensor, Tensor],
    step: int,
    *,
    beta2: float,
    eps: float,
) -> Tensor:
    """Elements ``[start, +numel)`` of the back-projected first moment (``back_flat``, flat in
    the true shape's row-major order) over their factored denominators, float32."""
    row, col = statistics
    first, stop = covering_rows(start, numel, shape[1])
    rows = factored_denominator_rows(row, col, first, stop, step, beta2, eps)
    # back_flat is the back-projection's own fresh buffer: divided in place when float32.
    return back_flat.float().div_(run_of_rows(rows, start, numel))
