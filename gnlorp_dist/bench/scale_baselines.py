"""The modelled steps that hold 7B on an 80 GB A100, and ours with its directions hidden behind
the next forward: every collective priced as :func:`~gnlorp_dist.bench.scale.collective_seconds`
prices it, overlapped by one schedule (:func:`pipeline_seconds`). A model, not a measurement.

- ``fsdp2-adamw``: ``fully_shard`` on every decoder layer and on the root (embedding, final norm,
  lm_head), bf16 parameters and gradients. Each layer's weights are all-gathered in forward and
  again in backward, its gradients reduce-scattered; the root is not resharded after forward
  (FSDP2's default for the root), so it is gathered once. The next layer's all-gather is
  prefetched while a layer computes; a layer's reduce-scatter overlaps the next layer's backward.
- ``zero3-adamw``: DeepSpeed ZeRO-3, every tensor partitioned and gathered as its submodule runs
  (one tensor prefetched ahead), gradients reduce-scattered in ``reduce_bucket_size`` buckets;
  parameters whose reuse distance is under ``stage3_max_reuse_distance`` (the end of forward,
  first in backward) are kept, not gathered again.
- ``ours-lowrank, directions overlapped with the next forward``: ``ours-lowrank`` whose direction
  (and dense row) broadcasts run layer by layer inside the next step's forward, one layer ahead.
  **Not implemented**: gnlorp_dist broadcasts them inside ``step()`` (issue #23 item 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gnlorp_dist.bench.communication import OURS_LOW_RANK, TensorShape
from gnlorp_dist.bench.scale_cluster import Cluster, Workload

FSDP2_ADAMW = "fsdp2-adamw"
ZERO3_ADAMW = "zero3-adamw"
SHARDED_BASELINES: tuple[str, ...] = (FSDP2_ADAMW, ZERO3_ADAMW)
"""The AdamW baselines that hold 7B on an 80 GB A100 (weights, gradients and states sharded)."""
OURS_NEXT_FORWARD = "ours-lowrank, directions overlapped with the next forward (opt-in)"
"""The row of ``ours-lowrank`` with its post-step broadcasts hidden behind the next forward."""


def short_name(method: str) -> str:
    """A column header's name for ``method`` (the next-forward row's name is a sentence)."""
    return "lowrank+next-fwd (opt-in)" if method == OURS_NEXT_FORWARD else method


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One piece of a forward or backward pass: what it gathers first, computes, then reduces."""

    fetch_s: float = 0.0
    """Seconds of the collective that must finish before the unit computes (prefetched: issued
    when the previous unit starts computing)."""
    compute_s: float = 0.0
    """Seconds of the unit's compute."""
    reduce_s: float = 0.0
    """Seconds of the collective issued when the unit's compute ends."""


def pipeline_seconds(units: Sequence[Unit]) -> float:
    """Wall time of ``units`` run in order on one compute stream and one network: the link runs
    collectives one at a time in the order they are issued (unit k+1's fetch when unit k starts
    computing, unit k's reduce when it ends), so fetches and reduces share its bandwidth. Never
    less than the compute or the link's total, never more than their sum."""
    if not units:
        return 0.0
    link = units[0].fetch_s
    fetched = [0.0] * len(units)
    fetched[0] = link
    compute = 0.0
    for k, unit in enumerate(units):
        start = max(compute, fetched[k])
        if k + 1 < len(units):
            link = max(link, start) + units[k + 1].fetch_s
            fetched[k + 1] = link
        compute = start + unit.compute_s
        if unit.reduce_s > 0:
            link = max(link, compute) + unit.reduce_s
    return max(compute, link)


def unit_key(name: str) -> str:
    """The piece of the model a tensor belongs to: ``embed``, ``layer.<i>``, or ``head`` (final
    norm and lm_head)."""
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("model.layers."):
        return "layer." + name.split(".")[2]
    return "head"


def layer_units(tensors: Sequence[TensorShape]) -> tuple[int, list[int], int]:
    """Elements of (embedding, each decoder layer in order, final norm + lm_head)."""
    embed = head = 0
    layers: dict[int, int] = {}
    for t in tensors:
        key = unit_key(t.name)
        if key == "embed":
            embed += t.numel
        elif key == "head":
            head += t.numel
        else:
            index = int(key.split(".")[1])
            layers[index] = layers.get(index, 0) + t.numel
    return embed, [layers[i] for i in sorted(layers)], head


def sharded_payload(method: str, plain: Sequence[TensorShape], elem: int, reuse: float) -> dict:
    """Bytes each rank hands to all-gathers and reduce-scatters in one step: three times the
    weights (gather in forward, gather in backward, reduce-scatter the gradients), less the
    backward gathers the method skips (FSDP2: the root; ZeRO-3: tensors kept within ``reuse``
    elements of their reuse)."""
    weights = sum(t.numel for t in plain) * elem
    if method == FSDP2_ADAMW:
        embed, _, head = layer_units(plain)
        skipped = (embed + head) * elem
    elif method == ZERO3_ADAMW:
        skipped = sum(n for n in _kept_in_backward(plain, reuse)) * elem
    else:
        raise ValueError(f"method {method!r} is not sharded; use one of {SHARDED_BASELINES}")
    return {"all_gather": 2 * weights - skipped, "reduce_scatter": weights}


def _forward_pieces(plain: Sequence[TensorShape]) -> list[int]:
    """Elements of each piece in the order forward uses them: embedding, layers, head."""
    embed, layers, head = layer_units(plain)
    return [embed, *layers, head]


def _kept_in_backward(plain: Sequence[TensorShape], reuse: float) -> list[int]:
    """Elements of the pieces ZeRO-3 keeps from forward to backward: the last ones forward
    used, while their total stays within the reuse distance (whole pieces: a layer's
    submodules are reused within a few million elements of each other)."""
    kept, total = [], 0
    for numel in reversed(_forward_pieces(plain)):
        if total + numel > reuse:
            break
        total += numel
        kept.append(numel)
    return kept


def _fsdp2_passes(
    plain: Sequence[TensorShape],
    price: Callable[[str, float], float],
    flops: Callable[[int], float],
) -> tuple[list[Unit], list[Unit], int]:
    """FSDP2's forward and backward units (``price(op, bytes)``: seconds, ``flops(numel)``:
    forward seconds of that many parameters) and its collective count."""
    embed, layers, head = layer_units(plain)
    root = embed + head
    forward = [Unit(fetch_s=price("all_gather", root))]
    forward += [Unit(fetch_s=price("all_gather", n), compute_s=flops(n)) for n in layers]
    forward += [Unit(compute_s=flops(root))]  # the root's FLOPs (lm_head) end the forward
    backward = [Unit(compute_s=2 * flops(root))]  # root kept gathered: no fetch
    backward += [
        Unit(
            fetch_s=price("all_gather", n),
            compute_s=2 * flops(n),
            reduce_s=price("reduce_scatter", n),
        )
        for n in reversed(layers)
    ]
    backward += [Unit(reduce_s=price("reduce_scatter", root))]  # the root's, after the embedding
    return forward, backward, 1 + 3 * len(layers) + 1


def _zero3_passes(
    plain: Sequence[TensorShape],
    price: Callable[[str, float], float],
    flops: Callable[[int], float],
    workload: Workload,
) -> tuple[list[Unit], list[Unit], int]:
    """ZeRO-3's forward and backward units, one per piece (its submodules gathered as they run,
    prefetched along the trace), gradients reduce-scattered in buckets, and its collective
    count."""
    pieces = _forward_pieces(plain)
    forward = [Unit(fetch_s=price("all_gather", n), compute_s=flops(n)) for n in pieces]
    kept = len(_kept_in_backward(plain, workload.zero3_reuse_distance))
    bucket = workload.zero3_reduce_bucket_elements
    backward, pending, reduces = [], 0, 0
    for i, numel in enumerate(reversed(pieces)):
        pending += numel
        flush = pending >= bucket or i == len(pieces) - 1
        backward.append(
            Unit(
                fetch_s=0.0 if i < kept else price("all_gather", numel),
                compute_s=2 * flops(numel),
                reduce_s=price("reduce_scatter", pending) if flush else 0.0,
            )
        )
        if flush:
            pending, reduces = 0, reduces + 1
    prefetch = workload.zero3_prefetch_elements
    gathered = sum(pieces) + sum(pieces[: len(pieces) - kept])
    return forward, backward, math.ceil(gathered / prefetch) + reduces


def sharded_row(
    method: str,
    plain: Sequence[TensorShape],
    cluster: Cluster,
    workload: Workload,
    price: Callable[[str, float], float],
) -> dict[str, Any]:
    """One sharded baseline's modelled step, serial and overlapped, in the keys of
    :func:`gnlorp_dist.bench.scale.step_model`'s rows."""
    elem = workload.elem_bytes
    params = sum(t.numel for t in plain)
    compute_s = 6 * params * workload.tokens_per_gpu / cluster.flops_per_s

    def flops(numel: int) -> float:
        return 2 * numel * workload.tokens_per_gpu / cluster.flops_per_s

    def priced(op: str, numel: float) -> float:
        return price(op, numel * elem)

    if method == FSDP2_ADAMW:
        forward, backward, collectives = _fsdp2_passes(plain, priced, flops)
    else:
        forward, backward, collectives = _zero3_passes(plain, priced, flops, workload)
    payload = sharded_payload(method, plain, elem, workload.zero3_reuse_distance)
    gather_s = sum(u.fetch_s for u in forward + backward)
    reduce_s = sum(u.reduce_s for u in backward)
    latency_s = collectives * cluster.latency_us * 1e-6
    return {
        "method": method,
        "grad_comm_s": reduce_s,
        "weight_comm_s": gather_s,
        "collectives": collectives,
        "latency_s": latency_s,
        "compute_s": compute_s,
        "backward_s": compute_s * 4 / 6,
        "projection_and_svd_s": 0.0,
        "step_s_no_overlap": compute_s + gather_s + reduce_s + latency_s,
        "step_s_overlap": pipeline_seconds(forward) + pipeline_seconds(backward) + latency_s,
        "payload_avg": {op: float(payload.get(op, 0)) for op in ("all_gather", "reduce_scatter")},
    }


def next_forward_row(
    ours: dict[str, Any],
    normed: Sequence[TensorShape],
    cluster: Cluster,
    workload: Workload,
    price: Callable[[str, float], float],
) -> dict[str, Any]:
    """``ours`` (the ``ours-lowrank`` row) with its post-step broadcasts hidden behind the next
    forward: each piece's share (embedding, each layer, head; the window's average, split as a
    plain step's bytes) gathered before the piece runs, one piece ahead. Not implemented."""
    assert ours["method"] == OURS_LOW_RANK, ours["method"]
    shares: dict[str, int] = {}
    for t in normed:
        key = unit_key(t.name)
        shares[key] = shares.get(key, 0) + t.low_rank_numel
    total = sum(shares.values())
    broadcast = ours["payload_avg"]["broadcast"]
    params = sum(t.numel for t in normed)
    forward_s = ours["compute_s"] - ours["backward_s"]
    keys = ["embed"] + sorted(
        (k for k in shares if k.startswith("layer.")), key=lambda k: int(k.split(".")[1])
    )
    numels: dict[str, int] = {}
    for t in normed:
        numels[unit_key(t.name)] = numels.get(unit_key(t.name), 0) + t.numel
    units = [
        Unit(
            fetch_s=price("broadcast", broadcast * shares[k] / total),
            compute_s=forward_s * numels[k] / params if k != "embed" else 0.0,
        )
        for k in keys
    ]
    units.append(
        Unit(
            fetch_s=price("broadcast", broadcast * shares["head"] / total),
            compute_s=forward_s * (numels["head"] + numels["embed"]) / params,
        )
    )
    wall = pipeline_seconds(units)
    row = dict(ours)
    row["method"] = OURS_NEXT_FORWARD
    row["step_s_overlap"] = ours["step_s_overlap"] - ours["weight_comm_s"] - forward_s + wall
    return row
