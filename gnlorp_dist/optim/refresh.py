"""When a projected matrix refreshes its subspace: the fixed gap, or the lazy rule.

Fixed (GaLore, the default): at steps 0, T, 2T, ... of the matrix (``T = update_proj_gap``).

Lazy (``lazy_refresh_threshold = s`` in ``(0, 1]``; Q-GaLore's idea, measured on the whole
subspace): at each refresh the owner compares the new basis with the one it replaces by
:func:`gnlorp_dist.optim.projection.subspace_overlap` (the mean squared cosine of ALL principal angles,
not the first singular vector's alone). A subspace that has settled (overlap >= ``s``) doubles
the gap to its next refresh, up to ``max_update_proj_gap`` (default ``8 T``); one that moved
(overlap < ``s``) goes back to ``T``. The next refresh step is kept in the state
(``next_refresh``) and travels with the basis, so every rank holding the matrix agrees on when
the next refresh (a collective) is due. Skipped refreshes are SVDs never computed.

Assembly (layouts whose gradients are not whole on the owner: ZeRO, FSDP2, the low-rank
reduction): a due matrix's whole gradient is summed onto its owner from every rank's zero-padded
run. At step 0 every matrix is due, so assembling them all at once would put the whole model's
gradient on every rank; :func:`refresh_batches` cuts the due matrices into batches of at most
:data:`REFRESH_BATCH_BYTES`, and :func:`assemble_full_gradients` assembles one batch at a time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.projection import Side, subspace_overlap
from gnlorp_dist.optim.spec import ProjectionSpec

if TYPE_CHECKING:
    from gnlorp_dist.optim.group_step import GroupStep

REFRESH_BATCH_BYTES: int | None = 256 * 2**20
"""The most bytes of full-gradient buffers a refresh keeps alive at once on a rank (the
zero-padded buffers in the wire dtype and, where that is not float32, their float32 copies for
the SVD). A matrix larger than this is assembled alone; None or 0: every due matrix at once.
Read at each refresh, so it can be set at any time, to the same value on every rank (the
batches are collectives)."""


def refresh_due(projection: ProjectionSpec, state: dict[str, Any]) -> bool:
    """THE refresh rule: at ``state["next_refresh"]`` once set by a refresh, else at steps 0,
    T, 2T, ... of the matrix (``T = update_proj_gap``)."""
    step = int(state.get("step", 0))
    if "next_refresh" in state:
        return step >= int(state["next_refresh"])
    return step % projection.update_proj_gap == 0


def next_gap(projection: ProjectionSpec, gap: int, overlap: float | None) -> int:
    """The gap after a refresh whose new basis overlaps the old one by ``overlap`` (None: no
    old basis, the first refresh)."""
    if not projection.lazy or overlap is None or overlap < projection.lazy_refresh_threshold:
        return projection.update_proj_gap
    return min(2 * gap, projection.max_gap)


def next_refresh_step(
    projection: ProjectionSpec,
    state: dict[str, Any],
    old_basis: Tensor | None,
    new_basis: Tensor,
    side: Side,
) -> int | None:
    """Lazy refresh: the step of the matrix's next refresh, decided at this one on the owner
    (``state`` records the gap and the overlap measured, for reports). None under the fixed
    gap, whose rule needs no state."""
    step = int(state.get("step", 0))
    if not projection.lazy:
        return None
    overlap = None
    if old_basis is not None:
        # One host read per refresh (the SVD before it synchronised already).
        overlap = float(subspace_overlap(old_basis, new_basis, side))
        state["subspace_overlap"] = overlap
    gap = next_gap(projection, int(state.get("proj_gap", projection.update_proj_gap)), overlap)
    state["proj_gap"] = gap
    return step + gap


def keep_next_refresh(state: dict[str, Any], next_step: int | None) -> None:
    if next_step is not None:
        state["next_refresh"] = next_step


def assembly_bytes(numel: int, wire_dtype: torch.dtype) -> int:
    """Bytes one matrix's assembly keeps alive: its buffer in ``wire_dtype`` plus, unless that
    is float32, the float32 copy the SVD reads. Every rank counts the owner's bytes, so every
    rank cuts the same batches (a non-owner frees its buffer once the reduce completes)."""
    wire = numel * wire_dtype.itemsize
    return wire if wire_dtype == torch.float32 else wire + 4 * numel


def cut_batches(sizes: list[int], cap: int | None) -> list[list[int]]:
    """Positions ``0 .. len(sizes) - 1`` in order, cut into consecutive batches whose sizes sum
    to at most ``cap`` (one larger than ``cap`` alone); ``cap`` None or <= 0: one batch."""
    if not sizes:
        return []
    if not cap or cap <= 0:
        return [list(range(len(sizes)))]
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for position, size in enumerate(sizes):
        if current and total + size > cap:
            batches.append(current)
            current, total = [], 0
        current.append(position)
        total += size
    batches.append(current)
    return batches


def refresh_batches(step: GroupStep, due: list[int]) -> list[list[int]]:
    """The due matrices ``due`` of ``step`` cut into batches of :data:`REFRESH_BATCH_BYTES`."""
    sizes = [assembly_bytes(math.prod(step.params[i].shape), step.wire_dtype(i)) for i in due]
    return [[due[p] for p in batch] for batch in cut_batches(sizes, REFRESH_BATCH_BYTES)]


def new_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed full-gradient buffer: every one a refresh assembles comes from here (tests
    replace it to count the bytes alive at once)."""
    return torch.zeros(numel, dtype=dtype, device=device)


def assemble_full_gradients(step: GroupStep, batch: list[int]) -> dict[int, Tensor]:
    """The whole float32 gradient of each matrix of ``batch`` this rank owns (averaged where
    the ranks' gradients were their own), summed from every rank's zero-padded run: each
    element comes from the one rank holding it, so the sum is exact. A collective: every rank
    calls it with the same ``batch``."""
    comm = step.comm
    owned: dict[int, Tensor] = {}
    others: list[Tensor] = []
    exchange = OwnerExchange(comm)
    for i in batch:
        full = new_buffer(math.prod(step.params[i].shape), step.wire_dtype(i), step.device)
        fragment = step.fragments[i]
        if fragment is not None:
            full[fragment.start : fragment.start + fragment.numel] = fragment.grad[: fragment.numel]
        exchange.reduce_sum(full, dst=step.owner(i))
        if step.owner(i) == comm.rank:
            owned[i] = full
        else:
            others.append(full)
    exchange.wait()
    for full in others:
        release(full)
    for i in list(owned):
        if owned[i].dtype != torch.float32:  # the SVD runs in float32 whatever travelled
            wire = owned.pop(i)
            owned[i] = new_buffer(wire.numel(), torch.float32, wire.device).copy_(wire)
            release(wire)
        if not step.layout.averaged:  # a sum of the ranks' own gradients: their mean
            owned[i].div_(comm.world_size)
    return owned


def release(buffer: Tensor) -> None:
    """Free ``buffer``'s memory now, whoever still references it: the handle of a finished
    collective may (gloo's worker thread drops the last one it ran a moment after ``wait()``
    returns), which would carry the buffer into the next batch, past the cap. On a GPU the
    caching allocator orders the reuse after the kernels already queued on the buffer."""
    buffer.untyped_storage().resize_(0)
