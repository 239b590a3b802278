"""How a projected group projects: granularity, the basis kind and the second-moment mode.

The driver asks these questions of a group (through :class:`~gnlorp_dist.optim.driver.GroupStep`)
and never branches on VLoRP itself elsewhere:

- the **projected shape** of a matrix: ``(M c, N / c)`` with ``granularity=c`` (VLoRP), else
  its true shape. The row-major reshape keeps every element's flat index, so a flat run of ``G``
  (ZeRO's partitions, a DDP row block) is the same flat run of the reshaped matrix: the fragment
  math works on the projected shape unchanged. Rows of the true matrix are ``c`` consecutive
  rows of the reshaped one, so row-aligned runs stay row-aligned;
- the **side**: a random basis projects on the right; an SVD basis follows ``proj_type`` on the
  projected shape (``c > 1`` must resolve to the right: validated at construction);
- the **basis**: an SVD basis is stored in the state (``proj``); a random one
  (``proj_type="random"``) is regenerated wherever it is needed from
  :func:`gnlorp_dist.vlorp.window_seed` of ``(projection_seed, parameter position, the step of
  the update, update_proj_gap)``: every micro-batch of a refresh window, every rank and a
  resumed run get the same basis, and nothing is stored, computed by SVD or broadcast;
- the **back-projection divisor**: ``r`` for a random basis (``E[P^T P] = r I``), else 1;
- the **second moment**: ``"adam"`` (the low-rank ``v``) or ``"factored"`` (ProjFactor: row and
  column sums of the squared back-projected gradient, ``row_sq`` / ``col_sq``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.projection import PROJ_TYPES, Side, projection_side
from gnlorp_dist.vlorp import random_basis, window_seed

SECOND_MOMENTS: tuple[str, ...] = ("adam", "factored")
OPTIMIZER_PROJ_TYPES: tuple[str, ...] = (*PROJ_TYPES, "random")
"""The SVD side rules of :data:`gnlorp_dist.projection.PROJ_TYPES` and ``"random"`` (VLoRP's
seeded Gaussian or Rademacher basis, right side)."""
FACTORED_KEYS = ("row_sq", "col_sq")


def granularity(group: dict[str, Any]) -> int:
    return int(group.get("granularity", 1))


def is_random(group: dict[str, Any]) -> bool:
    return group.get("proj_type") == "random"


def is_factored(group: dict[str, Any]) -> bool:
    return group.get("second_moment", "adam") == "factored"


def projected_shape(shape: tuple[int, ...], group: dict[str, Any]) -> tuple[int, int]:
    """The shape the group projects a ``shape`` matrix in: ``(M c, N / c)``, or ``shape``."""
    rows, cols = shape
    c = granularity(group)
    return (rows * c, cols // c) if c > 1 else (rows, cols)


def group_side(shape: tuple[int, ...], group: dict[str, Any]) -> Side:
    """The side a ``shape`` matrix is projected on (of its projected shape)."""
    if is_random(group):
        return "right"
    return projection_side(projected_shape(shape, group), group["proj_type"])


def planning_proj_type(group: dict[str, Any]) -> str | None:
    """The proj_type the ownership plan may size states with (it knows the SVD rules only)."""
    proj_type = group.get("proj_type")
    return "right" if proj_type == "random" else proj_type


def back_divisor(group: dict[str, Any]) -> int:
    """What the back-projection divides by: ``r`` for a random basis, 1 for an orthonormal one."""
    return int(group["rank"]) if is_random(group) else 1


def regenerate_basis(
    group: dict[str, Any],
    position: int,
    step: int,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The random basis ``(rank, N / c)`` of the refresh window holding ``step`` (0-based, the
    update being taken) for the parameter at ``position`` among all the optimizer's parameters."""
    seed = window_seed(
        int(group.get("projection_seed", 0)), position, step, int(group["update_proj_gap"])
    )
    return random_basis(
        projected_shape(shape, group)[1],
        int(group["rank"]),
        seed=seed,
        kind=group.get("random_basis", "gaussian"),
        dtype=dtype,
        device=device,
    )


def state_layout(
    shape: tuple[int, ...], group: dict[str, Any]
) -> tuple[int, tuple[int, int] | None, int]:
    """What a projected ``shape`` matrix keeps in the state, for estimators: ``(elements of one
    low-rank moment, the stored basis's shape or None for a random basis, float32 elements of
    the factored second moment (0 under Adam's))``. Under ``second_moment="factored"`` only the
    first low-rank moment is kept."""
    projected = projected_shape(shape, group)
    rank = min(int(group["rank"]), *projected)
    side = group_side(shape, group)
    rows, cols = projected
    moment = rows * rank if side == "right" else rank * cols
    basis = None if is_random(group) else ((rank, cols) if side == "right" else (rows, rank))
    factored = shape[0] + shape[1] if is_factored(group) else 0
    return moment, basis, factored
