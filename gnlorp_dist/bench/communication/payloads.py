"""Per-step payloads from parameter shapes (no run) and their wire bytes under the ring model.

Payload: the bytes each rank hands to collectives of each kind in one step. Wire bytes, ring
model: per rank, an all-reduce of S sends ``2(N-1)/N * S``; a reduce, a broadcast, a
reduce-scatter, an all-gather or an all-to-all of S ``(N-1)/N * S`` (gnlorp_dist sums onto owners
with one all-to-all per bucket, :mod:`gnlorp_dist.optim.owner_exchange`, and sends results back
with broadcasts from the owners: spread over owners, as here, they are a reduce-scatter and an
all-gather, and cost one all-reduce of S; NCCL's bus-bandwidth factors: 2(N-1)/N, (N-1)/N, and 1 for a single rooted op,
whose N-1 sending links each carry S). Ratios to DDP + AdamW do not depend on N.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from gnlorp_dist.bench.communication.schemes import (
    BASIS_WIRE_BYTES,
    COMPUTED_SCHEMES,
    DDP_ADAMW,
    DEEPSPEED_SCALAR_BYTES,
    OPS,
    OURS_DDP,
    OURS_FULL,
    OURS_LOW_RANK,
    OURS_LOW_RANK_NARROW,
    VERDICT_BYTES,
    ZERO2_ADAMW,
    ZERO2_TEXTBOOK,
    model_config,
    recipe,
)
from gnlorp_dist.bench.communication.shapes import TensorShape, shapes_from_model
from gnlorp_dist.optim.sparse_rows import mask_dtype, sparse_rows_pay

NEXT_STEP_BYTES = 8
"""The float64 next refresh step broadcast with each basis at a compressed refresh."""

Payload = dict[str, int]
"""Bytes each rank hands to collectives of each kind in one step (keys from :data:`OPS`)."""


def payload(**ops: int) -> Payload:
    """A payload with every kind of :data:`OPS`: ``ops``' bytes, 0 for the others."""
    return {op: int(ops.get(op, 0)) for op in OPS}


def _low_rank_payload(narrow: bool, normed: list[TensorShape], elem: int, refresh: bool) -> Payload:
    """``ours-lowrank`` (``narrow``: ``ours-lowrank-narrow``), see :func:`computed_payload`."""
    projected = [t for t in normed if t.rank is not None]
    dense = sum(t.numel for t in normed if t.rank is None) * elem
    # gnlorp_dist sends a projected matrix's low-rank gradients, full gradients at a refresh
    # and directions in the weights' dtype, its bases in float32; dense rows travel in the
    # gradient's dtype. NARROW: the bases in the weights' dtype too (not implemented).
    pelem = elem
    belem = elem if narrow else BASIS_WIRE_BYTES
    low_rank = sum(t.low_rank_numel for t in projected) * pelem
    if not refresh:
        return payload(
            all_to_all=low_rank + dense, broadcast=low_rank + dense, all_reduce=VERDICT_BYTES
        )
    # Every matrix refreshes at the same step (the counters move together): its full
    # gradient goes to the owner for the SVD, the new basis comes back, then the step runs
    # as a plain one (the low-rank gradients, projected with the new basis, reduced; the
    # direction broadcast). That last reduce is what gnlorp_dist does (measured); the owner
    # could project the full sum it already holds and save it.
    full = sum(t.numel for t in projected) * pelem
    basis = sum(t.basis_numel for t in projected) * belem
    # Each basis travels with its next refresh step (one float64: lazy refresh may move it).
    next_steps = NEXT_STEP_BYTES * len(projected)
    return payload(
        all_to_all=full + low_rank + dense,
        broadcast=basis + next_steps + low_rank + dense,
        all_reduce=VERDICT_BYTES,
    )


def computed_payload(
    method: str, plain: list[TensorShape], normed: list[TensorShape], elem: int, refresh: bool
) -> Payload:
    """One step's payload per rank for ``method`` from shapes. ``plain``: the plain model's
    tensors (AdamW baselines), ``normed``: the weight-normalised model's as grouped for our
    optimizer; ``elem``: bytes per gradient / weight element; ``refresh``: a refresh step."""
    full_plain = sum(t.numel for t in plain) * elem
    full_normed = sum(t.numel for t in normed) * elem
    if method == DDP_ADAMW:
        return payload(all_reduce=full_plain)
    if method == ZERO2_ADAMW:
        # DeepSpeed 0.19's default ("use_multi_rank_bucket_allreduce": true): every gradient
        # bucket all-reduced (each rank then keeps its partition), updated partitions
        # all-gathered; measured so by the benchmark. With that option false the buckets are
        # reduced to the partitions' owners instead (ZERO2_TEXTBOOK: traffic-neutral).
        return payload(all_reduce=full_plain + DEEPSPEED_SCALAR_BYTES, all_gather=full_plain)
    if method == ZERO2_TEXTBOOK:
        return payload(
            reduce_scatter=full_plain, all_gather=full_plain, all_reduce=DEEPSPEED_SCALAR_BYTES
        )
    if method == OURS_DDP:
        return payload(all_reduce=full_normed + VERDICT_BYTES, broadcast=full_normed)
    if method == OURS_FULL:
        return payload(all_to_all=full_normed, broadcast=full_normed, all_reduce=VERDICT_BYTES)
    if method in (OURS_LOW_RANK, OURS_LOW_RANK_NARROW):
        return _low_rank_payload(method == OURS_LOW_RANK_NARROW, normed, elem, refresh)
    raise ValueError(f"method {method!r} is not known; use one of {COMPUTED_SCHEMES}")


def with_touched_rows(
    computed: Payload,
    method: str,
    table_bytes: int,
    vocab: int,
    touched: int | None,
    world: int,
) -> Payload:
    """``computed`` (the whole embedding summed onto its owners) as the optimizer sends it when
    the global batch touched ``touched`` of the table's ``vocab`` rows
    (:mod:`gnlorp_dist.optim.sparse_rows`, under ``ours-full`` and ``ours-lowrank``): only those
    rows go into the all-to-all, after one all-reduce of a one-byte-per-row mask (``lm_head``,
    every row touched, is known dense after its first step). Other methods, or no count:
    ``computed`` unchanged, as where the rows do not pay (``sparse_rows_pay``: the optimizer
    then sends the whole table, its mask paid once)."""
    if touched is None or method not in (OURS_FULL, OURS_LOW_RANK) or not table_bytes:
        return computed
    row_bytes = table_bytes // vocab
    mask_bytes = vocab * mask_dtype(world).itemsize
    if not sparse_rows_pay(touched, vocab, row_bytes, mask_bytes):
        return computed
    adjusted = dict(computed)
    adjusted["all_to_all"] -= table_bytes - touched * row_bytes
    adjusted["all_reduce"] += mask_bytes
    return adjusted


def ring_factor(op: str, world: int) -> float:
    """Bytes EACH rank sends per payload byte under the ring model (see the module docstring):
    all-reduce ``2(N-1)/N``; reduce, broadcast, all-gather, reduce-scatter, all-to-all
    ``(N-1)/N``."""
    if op not in OPS:
        raise ValueError(f"collective {op!r} is not known; use one of {OPS}")
    if world <= 1:
        return 0.0
    share = (world - 1) / world
    return 2 * share if op == "all_reduce" else share


def ring_wire_bytes(payload: Payload, world: int) -> float:
    """Bytes each rank sends for ``payload`` under the ring model (the job sends N times it)."""
    return sum(ring_factor(op, world) * payload.get(op, 0) for op in OPS)


def window_average(plain: Payload, refresh: Payload, gap: int) -> dict[str, float]:
    """Per-step payload over ``gap`` steps holding one refresh: ``(refresh + (gap-1) plain)/gap``."""
    return {op: (refresh.get(op, 0) + (gap - 1) * plain.get(op, 0)) / gap for op in OPS}


def dense_breakdown(normed: list[TensorShape], elem: int) -> dict[str, int]:
    """The dense tensors' bytes by kind (what the compressed mode cannot shrink)."""
    kinds: dict[str, int] = defaultdict(int)
    for t in normed:
        if t.rank is not None:
            continue
        if "embed_tokens" in t.name:
            kind = "embed_tokens"
        elif t.name.startswith("lm_head"):
            kind = "lm_head"
        elif t.name.endswith("magnitude"):
            kind = "magnitudes"
        else:
            kind = "norms"
        kinds[kind] += t.numel * elem
    return dict(kinds)


def computed_rows(
    models: Sequence[str], world: int, elem_bytes: int, dtype_name: str
) -> list[dict[str, Any]]:
    """Per model: each method's payload (plain step, refresh step, average at the recipe's gap),
    ring wire bytes per rank at ``world`` ranks, and the ratio to DDP + AdamW."""
    rows = []
    for name in models:
        config = model_config(name)
        rank, gap = recipe(name)
        plain = shapes_from_model(config, rank, weight_norm=False)
        normed = shapes_from_model(config, rank, weight_norm=True)
        base_plain = computed_payload(DDP_ADAMW, plain, normed, elem_bytes, refresh=False)
        base_wire = ring_wire_bytes(base_plain, world)
        model = {
            "model": name,
            "params_plain": sum(t.numel for t in plain),
            "params_weight_normalised": sum(t.numel for t in normed),
            "rank": rank,
            "gap": gap,
            "world": world,
            "dtype": dtype_name,
        }
        shared = {
            "dense_bytes": dense_breakdown(normed, elem_bytes),
            "low_rank_bytes": sum(t.low_rank_numel for t in normed if t.rank) * elem_bytes,
            "projected_full_bytes": sum(t.numel for t in normed if t.rank) * elem_bytes,
        }
        for method in COMPUTED_SCHEMES:
            p = computed_payload(method, plain, normed, elem_bytes, refresh=False)
            r = computed_payload(method, plain, normed, elem_bytes, refresh=True)
            rows.append({**model, "method": method, **_wire(p, r, gap, world, base_wire), **shared})
    return rows


def _wire(p: Payload, r: Payload, gap: int, world: int, base_wire: float) -> dict[str, Any]:
    """A computed row's payloads, wire bytes per rank and ratios to ``base_wire`` (DDP +
    AdamW's plain step), plain, refresh and averaged over ``gap`` steps."""
    avg = window_average(p, r, gap)
    return {
        "payload_plain": p,
        "payload_refresh": r,
        "payload_avg": avg,
        "wire_per_rank_plain": ring_wire_bytes(p, world),
        "wire_per_rank_refresh": ring_wire_bytes(r, world),
        "wire_per_rank_avg": ring_wire_bytes(avg, world),  # type: ignore[arg-type]
        "ratio_plain": ring_wire_bytes(p, world) / base_wire,
        "ratio_refresh": ring_wire_bytes(r, world) / base_wire,
        "ratio_avg": ring_wire_bytes(avg, world) / base_wire,  # type: ignore[arg-type]
    }
