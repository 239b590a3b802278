"""How a projected group projects: granularity, the basis kind and the second-moment mode.

The driver asks these questions of a group's :class:`~gnlorp_dist.optim.spec.ProjectionSpec`
(through :class:`~gnlorp_dist.optim.group_step.GroupStep`) and never branches on VLoRP itself
elsewhere; the shape and side rules are the spec's methods, the basis regeneration and its
device record are here:

- the **projected shape** of a matrix: ``(M c, N / c)`` with ``granularity=c`` (VLoRP), else
  its true shape. The row-major reshape keeps every element's flat index, so a flat run of ``G``
  (ZeRO's partitions, a DDP row block) is the same flat run of the reshaped matrix: the fragment
  math works on the projected shape unchanged. Rows of the true matrix are ``c`` consecutive
  rows of the reshaped one, so row-aligned runs stay row-aligned;
- the **side**: a random basis projects on the right; an SVD basis follows ``proj_type`` on the
  projected shape (``c > 1`` must resolve to the right: validated at construction);
- the **basis**: an SVD basis is stored in the state (``proj``); a random one
  (``proj_type="random"``) is regenerated wherever it is needed from
  :func:`gnlorp_dist.optim.vlorp.window_seed` of ``(projection_seed, parameter position, the step of
  the update, update_proj_gap)``, on the device that uses it (:func:`gnlorp_dist.optim.vlorp.random_basis`):
  every micro-batch of a refresh window, every rank and a resumed run on the same kind of device
  get the same basis, and nothing is stored, computed by SVD or broadcast. The group records
  the device type that draws its bases (:func:`check_random_basis_device`): a run resumed on
  another type mid-window is refused;
- the **back-projection divisor**: ``r`` for a random basis (``E[P^T P] = r I``), else 1;
- the **second moment**: ``"adam"`` (the low-rank ``v``) or ``"factored"`` (ProjFactor: row and
  column sums of the squared back-projected gradient, ``row_sq`` / ``col_sq``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor

from gnlorp_dist.optim.spec import (
    BASIS_DEVICE_KEY,
    OPTIMIZER_PROJ_TYPES,
    SECOND_MOMENTS,
    ProjectionSpec,
    moments_of,
    projection_of,
    record_basis_device,
    recorded_basis_device,
)
from gnlorp_dist.optim.vlorp import random_basis, window_seed

__all__ = [
    "BASIS_DEVICE_KEY",
    "FACTORED_KEYS",
    "OPTIMIZER_PROJ_TYPES",
    "SECOND_MOMENTS",
    "check_random_basis_device",
    "regenerate_basis",
    "state_layout",
]

FACTORED_KEYS = ("row_sq", "col_sq")


def regenerate_basis(
    projection: ProjectionSpec,
    position: int,
    step: int,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The random basis ``(rank, N / c)`` of the refresh window holding ``step`` (0-based, the
    update being taken) for the parameter at ``position`` among all the optimizer's parameters."""
    seed = window_seed(projection.projection_seed, position, step, projection.update_proj_gap)
    return random_basis(
        projection.projected_shape(shape)[1],
        projection.rank,
        seed=seed,
        kind=projection.random_basis,
        dtype=dtype,
        device=device,
    )


class _Gatherer(Protocol):
    world_size: int

    def all_gather_object(self, obj: object) -> list[object]: ...


def check_random_basis_device(
    projection: ProjectionSpec,
    group: dict[str, Any],
    states: Iterable[dict[str, Any]],
    device_type: str,
    comm: _Gatherer,
) -> None:
    """Refuse to continue a refresh window of random bases on another kind of device.

    CPU and CUDA generators draw different numbers for the same seed, so a window begun on one
    would go on with another basis on the other: the low-rank moments would silently change
    subspace mid-window. ``group`` (the param-group dict: the record is saved with it) records
    the device type its bases are drawn on; when this step draws elsewhere, it goes on (and
    records the new type) only if every matrix of the group, on every rank, is at the start of
    a window (its step a multiple of ``update_proj_gap``): the new window's basis is then a
    fresh draw, like any window's. Otherwise a ValueError. A state saved before the record
    existed was drawn on the CPU. ``states``: this rank's states of the group's matrices,
    iterated only when the device type changes (a per-layer hook passes a generator: the usual
    call is one lookup). Host work only; the ranks agree in one ``all_gather_object`` when the
    device type changes (all together: the record is the same on every rank), never on the hot
    path.
    """
    recorded = recorded_basis_device(group)
    if recorded == device_type:
        return
    gap = projection.update_proj_gap
    steps = [int(state.get("step", 0)) for state in states]
    mine = (any(step % gap for step in steps), any(step > 0 for step in steps))
    seen = comm.all_gather_object(mine) if comm.world_size > 1 else [mine]
    mid_window = any(bool(flags[0]) for flags in seen)  # type: ignore[index]
    started = any(bool(flags[1]) for flags in seen)  # type: ignore[index]
    drawn_on = recorded if recorded is not None else ("cpu" if started else None)
    if drawn_on not in (None, device_type) and mid_window:
        steps_now = sorted(set(steps))
        raise ValueError(
            f"random projection bases (proj_type='random'): this run draws them on {device_type} "
            f"but the refresh windows in progress (steps {steps_now}, "
            f"update_proj_gap={gap}) were drawn on {drawn_on}; {drawn_on} and {device_type} "
            "generators give different bases for the same seed, so resuming mid-window would "
            f"silently change each matrix's subspace. Resume on {drawn_on}, or resume from a "
            f"checkpoint saved at a multiple of update_proj_gap={gap} steps (the next window "
            f"then draws on {device_type})."
        )
    record_basis_device(group, device_type)


def state_layout(
    shape: tuple[int, ...], group: dict[str, Any]
) -> tuple[int, tuple[int, int] | None, int]:
    """What a matrix of ``shape`` in the projected param group ``group`` (a dict) keeps in the
    state, for estimators: ``(elements of one low-rank moment, the stored basis's shape or None
    for a random basis, float32 elements of the factored second moment (0 under Adam's))``.
    Under ``second_moment="factored"`` only the first low-rank moment is kept."""
    projection = projection_of(group)
    assert projection is not None, "state_layout is for projected groups"
    projected = projection.projected_shape(shape)
    rank = min(projection.rank, *projected)
    side = projection.side(shape)
    rows, cols = projected
    moment = rows * rank if side == "right" else rank * cols
    basis = None if projection.random else ((rank, cols) if side == "right" else (rows, rank))
    factored = shape[0] + shape[1] if moments_of(group).factored else 0
    return moment, basis, factored
