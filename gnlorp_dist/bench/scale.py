"""The modelled step time of ``python -m benchmarks.scale_model``: a method's collective payloads
(:mod:`gnlorp_dist.bench.communication`) priced on a two-level cluster (NVLink inside a node,
the network between nodes), next to its compute, with and without overlapping the gradient
collectives with backward. A model, not a measurement: see the script's docstring for every
assumption; :func:`assumptions` prints them with the figures. The cluster and the workload
are :mod:`.scale_cluster`'s; FSDP2, ZeRO-3 and the next-forward overlap :mod:`.scale_baselines`'.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from gnlorp_dist.bench.communication import (
    COMPUTED_SCHEMES,
    DDP_ADAMW,
    OPS,
    OURS_DDP,
    OURS_FULL,
    OURS_LOW_RANK,
    OURS_LOW_RANK_NARROW,
    ZERO2_ADAMW,
    ZERO2_TEXTBOOK,
    Payload,
    TensorShape,
    computed_payload,
    model_config,
    shapes_from_model,
    window_average,
)
from gnlorp_dist.bench.harness import format_table
from gnlorp_dist.bench.scale_baselines import (
    SHARDED_BASELINES,
    next_forward_row,
    sharded_row,
    short_name,
)
from gnlorp_dist.bench.scale_cluster import Cluster, Workload, collective_seconds

__all__ = ["Cluster", "Workload", "assumptions", "collective_seconds", "model_rows", "step_model"]

GRADIENT_PHASE: dict[str, tuple[str, ...]] = {
    # Which collectives carry gradients (may overlap backward); the rest run after the step.
    DDP_ADAMW: ("all_reduce",),
    ZERO2_ADAMW: ("all_reduce",),
    ZERO2_TEXTBOOK: ("reduce_scatter",),
    OURS_DDP: ("all_reduce",),
    OURS_FULL: ("all_to_all",),
    OURS_LOW_RANK: ("all_to_all",),
    OURS_LOW_RANK_NARROW: ("all_to_all",),
}
OURS = (OURS_DDP, OURS_FULL, OURS_LOW_RANK, OURS_LOW_RANK_NARROW)
COMPRESSED = (OURS_LOW_RANK, OURS_LOW_RANK_NARROW)


def collective_count(
    method: str, op: str, payload: float, workload: Workload, n_tensors: int
) -> int:
    """How many collectives carry ``payload``: DDP-style buckets; ours: one all-to-all per
    bucket of the same size, and a broadcast per owner with tensors in a bucket (at most one
    per tensor block); the bases' broadcasts one per tensor."""
    if payload <= 0:
        return 0
    buckets = math.ceil(payload / (workload.ddp_bucket_mib * 2**20))
    if method in (DDP_ADAMW, OURS_DDP) and op == "all_reduce" and payload > 64:
        return buckets
    if method in OURS and op == "all_to_all":
        return buckets
    if method in (ZERO2_ADAMW, ZERO2_TEXTBOOK):
        return math.ceil(payload / (5e8 * workload.elem_bytes))  # DeepSpeed's 5e8-element buckets
    return n_tensors if payload > 64 else 1


def step_model(
    method: str,
    payload: dict[str, float],
    cluster: Cluster,
    workload: Workload,
    params: int,
    projected: list[TensorShape],
    n_tensors: int,
) -> dict[str, Any]:
    """One method's modelled step from its per-step (gap-averaged) payload."""
    phase = GRADIENT_PHASE[method]
    grad_s = sum(collective_seconds(op, payload[op], cluster) for op in phase)
    post_s = sum(collective_seconds(op, payload[op], cluster) for op in OPS if op not in phase)
    collectives = sum(collective_count(method, op, payload[op], workload, n_tensors) for op in OPS)
    latency_s = collectives * cluster.latency_us * 1e-6
    compute_s = 6 * params * workload.tokens_per_gpu / cluster.flops_per_s
    backward_s = compute_s * 4 / 6
    proj_flops = sum(4 * t.numel * t.rank for t in projected)  # project + back-project
    if method in COMPRESSED:
        extra_s = proj_flops / cluster.flops_per_s  # every GPU, every matrix
    elif method in (OURS_DDP, OURS_FULL):
        extra_s = proj_flops / cluster.world / cluster.flops_per_s  # owners only
    else:
        extra_s = 0.0
    if method in OURS:
        svds_per_gpu = math.ceil(len(projected) / cluster.world)
        extra_s += svds_per_gpu * workload.svd_s_per_matrix / workload.gap
    no_overlap = compute_s + extra_s + grad_s + post_s + latency_s
    # Overlap: gradient collectives run during backward; the last bucket (or, for one
    # collective per tensor, the last tensor's share) is left after it.
    last = grad_s / max(
        1, collective_count(method, phase[0], payload[phase[0]], workload, n_tensors)
    )
    # Never more than running them all after backward (the serial figure).
    exposed_grad = min(max(grad_s - backward_s, 0.0) + last, grad_s)
    overlap = compute_s + extra_s + exposed_grad + post_s + latency_s
    return {
        "method": method,
        "grad_comm_s": grad_s,
        "weight_comm_s": post_s,
        "collectives": collectives,
        "latency_s": latency_s,
        "compute_s": compute_s,
        "backward_s": backward_s,
        "projection_and_svd_s": extra_s,
        "step_s_no_overlap": no_overlap,
        "step_s_overlap": overlap,
    }


@functools.lru_cache(maxsize=4)
def model_shapes(model: str, rank: int) -> tuple[tuple[TensorShape, ...], tuple[TensorShape, ...]]:
    """The plain and the weight-normalised model's tensors (built once per model and rank)."""
    config = model_config(model)
    plain = shapes_from_model(config, rank, weight_norm=False)
    normed = shapes_from_model(config, rank, weight_norm=True)
    return tuple(plain), tuple(normed)


def model_rows(cluster: Cluster, workload: Workload) -> list[dict[str, Any]]:
    """Every method's modelled step (the computed schemes, then FSDP2 and ZeRO-3 + AdamW, then
    ``ours-lowrank`` with its directions overlapped with the next forward), with ratios to
    ``ddp-adamw``'s step in the same column."""
    plain_t, normed_t = model_shapes(workload.model, workload.rank)
    plain, normed = list(plain_t), list(normed_t)
    projected = [t for t in normed if t.rank is not None]

    def price(op: str, payload: float) -> float:
        return collective_seconds(op, payload, cluster)

    rows = []
    for method in COMPUTED_SCHEMES:
        p: Payload = computed_payload(method, plain, normed, workload.elem_bytes, refresh=False)
        r: Payload = computed_payload(method, plain, normed, workload.elem_bytes, refresh=True)
        avg = window_average(p, r, workload.gap)
        ours = method in OURS
        tensors = normed if ours else plain
        # Big dense tensors travel as one block per rank, everything else whole.
        blocks = sum(cluster.world if t.numel >= 2**20 and t.rank is None else 1 for t in tensors)
        row = step_model(
            method,
            avg,
            cluster,
            workload,
            sum(t.numel for t in plain),
            projected if ours else [],
            blocks,
        )
        row["payload_avg"] = avg
        rows.append(row)
        if method == OURS_LOW_RANK:
            next_forward = next_forward_row(row, normed, cluster, workload, price)
    rows += [sharded_row(m, plain, cluster, workload, price) for m in SHARDED_BASELINES]
    rows.append(next_forward)
    base = next(r for r in rows if r["method"] == DDP_ADAMW)
    tokens = workload.tokens_per_gpu
    for row in rows:
        row["x_ddp_no_overlap"] = row["step_s_no_overlap"] / base["step_s_no_overlap"]
        row["x_ddp_overlap"] = row["step_s_overlap"] / base["step_s_overlap"]
        row["tokens_per_s_per_gpu_overlap"] = tokens / row["step_s_overlap"]
        row["comm_share_no_overlap"] = (
            row["grad_comm_s"] + row["weight_comm_s"] + row["latency_s"]
        ) / row["step_s_no_overlap"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "method",
        "grad comm s",
        "weight comm s",
        "latency s",
        "compute s",
        "proj+SVD s",
        "step s (serial)",
        "x ddp",
        "comm share",
        "step s (overlap)",
        "x ddp",
        "tokens/s/GPU",
    ]
    body = [
        [
            r["method"],
            f"{r['grad_comm_s']:.3f}",
            f"{r['weight_comm_s']:.3f}",
            f"{r['latency_s']:.3f}",
            f"{r['compute_s']:.3f}",
            f"{r['projection_and_svd_s']:.3f}",
            f"{r['step_s_no_overlap']:.3f}",
            f"{r['x_ddp_no_overlap']:.3f}",
            f"{r['comm_share_no_overlap']:.0%}",
            f"{r['step_s_overlap']:.3f}",
            f"{r['x_ddp_overlap']:.3f}",
            f"{r['tokens_per_s_per_gpu_overlap']:,.0f}",
        ]
        for r in rows
    ]
    return format_table(headers, body)


def assumptions(cluster: Cluster, workload: Workload) -> str:
    ib = cluster.ib_gbits_per_s / 8
    return "\n".join(
        [
            "MODELLED, not measured. Assumptions:",
            f"- {cluster.nodes} nodes x {cluster.gpus_per_node} A100 = {cluster.world} GPUs; "
            f"NVLink {cluster.nvlink_gbytes_per_s:.0f} GB/s per GPU each way (A100: 600 GB/s "
            f"both ways); network {cluster.ib_gbits_per_s:.0f} Gb/s = {ib:.1f} GB/s per node "
            f"each way (one InfiniBand port; HDR is 200 Gb/s); NCCL reaches {cluster.link_efficiency:.0%} of "
            f"each; {cluster.latency_us:.0f} us per collective.",
            "- Collectives two-level: all-reduce of S = 2(g-1)/g S on NVLink + 2(n-1)/n S "
            "through each node's port; reduce-scatter, all-gather and owner-spread "
            "reduces/broadcasts half that (NCCL bus-bandwidth factors, nccl-tests "
            "doc/PERFORMANCE.md).",
            f"- {workload.model}: rank {workload.rank}, refresh gap T={workload.gap}, bf16 "
            f"gradients/weights/bases; {workload.tokens_per_gpu:,} tokens per GPU per step "
            f"({workload.tokens_per_gpu * cluster.world:,} per step).",
            f"- Compute 6 x params x tokens at {cluster.peak_tflops:.0f} TFLOP/s peak x "
            f"MFU {cluster.mfu:.2f} = {cluster.flops_per_s / 1e12:.0f} TFLOP/s per GPU; "
            "backward = 4/6 of it. Ours: 4 M N r FLOPs per projected matrix (project + back-"
            "project) on every GPU in the compressed mode, on its owner otherwise; refresh SVDs "
            f"{workload.svd_s_per_matrix} s per matrix on its owner, once per T steps.",
            "- Overlap: gradient collectives hide behind backward except the last bucket / "
            "block; post-step collectives (weight or direction broadcasts, ZeRO's all-gather) "
            "exposed. ours-lowrank overlaps under reducing_in_backward() (gnlorp-train's "
            "default); ours-full has no backward hooks (its overlap row is hypothetical).",
            "- zero2-adamw: DeepSpeed 0.19's default (gradient buckets all-reduced, parameters "
            "all-gathered: measured so by benchmarks/communication.py); zero2-rs: reduce-scatter "
            '+ all-gather ("use_multi_rank_bucket_allreduce": false).',
            "- fsdp2-adamw: fully_shard per decoder layer + the root (embedding, norm, lm_head), "
            "bf16 parameters and gradients: each layer all-gathered in forward and again in "
            "backward, gradients reduce-scattered (3x the weights; the root is not resharded "
            "after forward, FSDP2's default, so 3x less one root gather). zero3-adamw: DeepSpeed "
            "ZeRO-3, every piece gathered twice (less the pieces within "
            f"stage3_max_reuse_distance={workload.zero3_reuse_distance:.0e} elements of reuse), "
            f"gradients reduce-scattered in {workload.zero3_reduce_bucket_elements:.0e}-element "
            f"buckets, one collective per {workload.zero3_prefetch_elements:.0e} gathered "
            "elements. Their overlap is one schedule: the next piece's all-gather prefetched "
            "while a piece computes, its reduce-scatter issued when it ends and overlapping the "
            "next piece's backward, all on one network link in issue order; compute split over "
            "pieces by parameters (the embedding's FLOPs counted with lm_head's).",
            "- ours-lowrank, directions overlapped with the next forward (opt-in: "
            "optimizer.applying_directions_in_forward(model)): the same schedule hides each piece's "
            "share of the post-step broadcasts (split as a plain step's low-rank bytes) behind "
            "the next forward, one piece ahead; the first piece's share stays exposed.",
            "- Not modelled: the AdamW update's memory traffic, activations, stragglers. DDP + "
            "AdamW at 7B needs 16 B/param = 108 GB per GPU: it does not fit an 80 GB A100 "
            "(a communication baseline here); fsdp2-adamw and zero3-adamw are the baselines "
            "that run there.",
        ]
    )


def summary_table(summary: list[tuple[int, float, list[dict[str, Any]]]]) -> str:
    """Every method's step over ddp-adamw's (serial / overlapped) for each (tokens per GPU,
    network Gb/s) setting, and ours-lowrank's serial step over the overlapped baselines."""
    headers = ["tokens/GPU", "Gb/s"]
    headers += [short_name(r["method"]) for r in summary[0][2] if r["method"] != DDP_ADAMW]
    headers += ["lowrank serial / ddp overlap", "/ ours-ddp overlap"]
    body = []
    for tokens, ib, rows in summary:
        by = {r["method"]: r for r in rows}
        # A loop without reducing_in_backward() reduces inside step() (serial) while DDP
        # overlaps its all-reduce with backward.
        serial = by[OURS_LOW_RANK]["step_s_no_overlap"]
        body.append(
            [f"{tokens:,}", f"{ib:.0f}"]
            + [
                f"{r['x_ddp_no_overlap']:.2f} / {r['x_ddp_overlap']:.2f}"
                for r in rows
                if r["method"] != DDP_ADAMW
            ]
            + [
                f"{serial / by[DDP_ADAMW]['step_s_overlap']:.2f}",
                f"{serial / by[OURS_DDP]['step_s_overlap']:.2f}",
            ]
        )
    return format_table(headers, body)
