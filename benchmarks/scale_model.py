"""Modelled step time of LLaMA 7B on 8 nodes x 4 A100: DDP + AdamW, ZeRO-2 + AdamW, GradNormLoRP
uncompressed and with low-rank gradient communication. A simulation: nothing here runs on a
cluster, and every figure it prints is modelled from the assumptions it prints with it.

What is modelled, per optimizer step (all in seconds):

- **bytes**: each method's collective payloads per step, from the parameter shapes
  (``benchmarks/communication.py``'s ``computed_payload``: the real weight-normalised model and
  ``projected_param_groups`` on the meta device), in bf16, for a plain step and a refresh step,
  averaged over the refresh gap T;
- **collective time**, two-level (as NCCL's rings and trees cross each node boundary through the
  node's network adapter, and stay on NVLink inside a node). For a payload S over ``g`` GPUs per
  node and ``n`` nodes: an all-reduce moves ``2(g-1)/g * S`` per GPU over NVLink and
  ``2(n-1)/n * S`` per node over the network (reduce-scatter inside the node, all-reduce of the
  node's shards between nodes, all-gather inside the node); a reduce-scatter, an all-gather, and
  reduces or broadcasts spread over owners (which together are a reduce-scatter or an
  all-gather) half of each. These are NCCL's bus-bandwidth factors (nccl-tests,
  ``doc/PERFORMANCE.md``: busBw = algBw x 2(n-1)/n for AllReduce, x (n-1)/n for ReduceScatter
  and AllGather, x 1 for Broadcast and Reduce, where one rooted operation keeps each of the n-1
  sending links busy with all of S) applied per level. Time = bytes / (link bandwidth x
  efficiency), NVLink and network levels in sequence, plus a latency per collective;
- **compute**: ``6 x params x tokens`` FLOPs per step (forward 2, backward 4; Kaplan et al.
  2020) at ``peak x MFU`` per GPU; ours adds the projections (``2 M N r`` FLOPs to project a
  gradient, the same to project back): every GPU projects every matrix in the compressed mode,
  each owner only its own matrices otherwise; and the refresh SVDs (on owners, once per T steps,
  a given time per matrix);
- **overlap**: without it, every collective runs after backward. With it, the gradient-reduction
  collectives (DDP's bucket all-reduces; ZeRO-2's gradient reduction; ours: the reduces to the
  owners) hide behind backward except the last bucket; the collectives after the optimizer step
  (our weight or direction broadcasts, ZeRO's parameter all-gather) stay exposed.
  ``ours-lowrank`` reduces from gradient hooks when the loop wraps backward in the optimizer's
  ``reducing_in_backward()`` (``gnlorp-train`` does by default, ``--overlap-reduction on``); a
  loop that only calls ``step()`` gets the no-overlap row. ``ours-full`` has no such hooks: its
  overlap row is what they would give.

Not modelled: the AdamW update's memory traffic (DDP + AdamW updates all 6.7B parameters on
every GPU; the others a 1/N share), activation memory, stragglers, congestion between jobs,
pipelining of a step's broadcasts into the next forward. DDP + AdamW at 7B holds 16 bytes per
parameter (108 GB) on each GPU: it does not fit an 80 GB A100 and is here as the communication
baseline only.

Usage::

    python -m benchmarks.scale_model
    python -m benchmarks.scale_model --ib-gbps 400 --mfu 0.4 --tokens-per-gpu 4096
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.communication import (
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
from gnlorp_dist.bench.harness import RESULTS_DIR, environment, format_table, write_json

GRADIENT_PHASE: dict[str, tuple[str, ...]] = {
    # Which collectives carry gradients (may overlap backward); the rest run after the step.
    DDP_ADAMW: ("all_reduce",),
    ZERO2_ADAMW: ("all_reduce",),
    ZERO2_TEXTBOOK: ("reduce_scatter",),
    OURS_DDP: ("all_reduce",),
    OURS_FULL: ("reduce",),
    OURS_LOW_RANK: ("reduce",),
    OURS_LOW_RANK_NARROW: ("reduce",),
}
OURS = (OURS_DDP, OURS_FULL, OURS_LOW_RANK, OURS_LOW_RANK_NARROW)
COMPRESSED = (OURS_LOW_RANK, OURS_LOW_RANK_NARROW)


@dataclass(frozen=True)
class Cluster:
    """The machine. Defaults: 8 DGX-A100-like nodes with 4 GPUs used per node."""

    nodes: int = 8
    gpus_per_node: int = 4
    # A100 SXM: third-generation NVLink, 12 links, 600 GB/s per GPU in both directions
    # together, i.e. 300 GB/s each way (NVIDIA A100 datasheet).
    nvlink_gbytes_per_s: float = 300.0
    # HDR InfiniBand: 200 Gb/s per port, one port per node here = 25 GB/s each way.
    ib_gbits_per_s: float = 200.0
    # Fraction of a link's rate NCCL reaches on large messages (nccl-tests on A100 report
    # bus bandwidths around 75-90% of the links').
    link_efficiency: float = 0.8
    # Fixed cost per collective (launch and small-message latency across nodes).
    latency_us: float = 30.0
    # A100 dense bf16 tensor-core peak (datasheet), and the fraction a 7B training reaches.
    peak_tflops: float = 312.0
    mfu: float = 0.48

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def flops_per_s(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu


@dataclass(frozen=True)
class Workload:
    model: str = "llama_7b"
    rank: int = 1024
    gap: int = 200
    tokens_per_gpu: int = 8 * 2048  # sequences x length per GPU per step
    elem_bytes: int = 2  # bf16 gradients, weights, bases
    ddp_bucket_mib: float = 25.0  # DDP's default bucket_cap_mb
    svd_s_per_matrix: float = 0.5  # a 4096 x 11008 fp32 SVD on one A100: an assumption


def collective_seconds(op: str, payload: float, cluster: Cluster) -> float:
    """Bandwidth time of ``op`` on ``payload`` bytes (no latency): NVLink level, then network."""
    if payload <= 0:
        return 0.0
    g, n = cluster.gpus_per_node, cluster.nodes
    factor = 2.0 if op == "all_reduce" else 1.0
    intra = factor * (g - 1) / g * payload / (cluster.nvlink_gbytes_per_s * 1e9)
    inter = factor * (n - 1) / n * payload / (cluster.ib_gbits_per_s / 8 * 1e9)
    return (intra + inter) / cluster.link_efficiency


def collective_count(
    method: str, op: str, payload: float, workload: Workload, n_tensors: int
) -> int:
    """How many collectives carry ``payload``: DDP-style buckets, or one per tensor block."""
    if payload <= 0:
        return 0
    if method in (DDP_ADAMW, OURS_DDP) and op == "all_reduce" and payload > 64:
        return math.ceil(payload / (workload.ddp_bucket_mib * 2**20))
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
    exposed_grad = max(grad_s - backward_s, 0.0) + min(last, grad_s)
    overlap = compute_s + extra_s + exposed_grad + post_s + latency_s
    return {
        "method": method,
        "grad_comm_s": grad_s,
        "post_step_comm_s": post_s,
        "collectives": collectives,
        "latency_s": latency_s,
        "compute_s": compute_s,
        "backward_s": backward_s,
        "projection_and_svd_s": extra_s,
        "step_s_no_overlap": no_overlap,
        "step_s_overlap": overlap,
    }


def model_rows(cluster: Cluster, workload: Workload) -> list[dict[str, Any]]:
    config = model_config(workload.model)
    plain = shapes_from_model(config, workload.rank, weight_norm=False)
    normed = shapes_from_model(config, workload.rank, weight_norm=True)
    projected = [t for t in normed if t.rank is not None]
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
    base = next(r for r in rows if r["method"] == DDP_ADAMW)
    tokens = workload.tokens_per_gpu
    for row in rows:
        row["x_ddp_no_overlap"] = row["step_s_no_overlap"] / base["step_s_no_overlap"]
        row["x_ddp_overlap"] = row["step_s_overlap"] / base["step_s_overlap"]
        row["tokens_per_s_per_gpu_overlap"] = tokens / row["step_s_overlap"]
        row["comm_share_no_overlap"] = (
            row["grad_comm_s"] + row["post_step_comm_s"] + row["latency_s"]
        ) / row["step_s_no_overlap"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "method",
        "grad comm s",
        "post-step comm s",
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
            f"{r['post_step_comm_s']:.3f}",
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
            "- Not modelled: the AdamW update's memory traffic, activations, stragglers. DDP + "
            "AdamW at 7B needs 16 B/param = 108 GB per GPU: it does not fit an 80 GB A100 "
            "(a communication baseline here).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults_c, defaults_w = Cluster(), Workload()
    parser.add_argument("--nodes", type=int, default=defaults_c.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=defaults_c.gpus_per_node)
    parser.add_argument("--nvlink-gbytes", type=float, default=defaults_c.nvlink_gbytes_per_s)
    parser.add_argument("--ib-gbps", type=float, nargs="+", default=[defaults_c.ib_gbits_per_s])
    parser.add_argument("--efficiency", type=float, default=defaults_c.link_efficiency)
    parser.add_argument("--latency-us", type=float, default=defaults_c.latency_us)
    parser.add_argument("--peak-tflops", type=float, default=defaults_c.peak_tflops)
    parser.add_argument("--mfu", type=float, default=defaults_c.mfu)
    parser.add_argument("--model", default=defaults_w.model)
    parser.add_argument("--rank", type=int, default=defaults_w.rank)
    parser.add_argument("--gap", type=int, default=defaults_w.gap)
    parser.add_argument(
        "--tokens-per-gpu", type=int, nargs="+", default=[defaults_w.tokens_per_gpu]
    )
    parser.add_argument("--svd-s", type=float, default=defaults_w.svd_s_per_matrix)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "scale_model.json")
    args = parser.parse_args(argv)
    record: dict[str, Any] = {"benchmark": "scale_model", "modelled": True, "runs": []}
    summary = []
    for tokens in args.tokens_per_gpu:
        workload = Workload(
            model=args.model,
            rank=args.rank,
            gap=args.gap,
            tokens_per_gpu=tokens,
            svd_s_per_matrix=args.svd_s,
        )
        for ib in args.ib_gbps:
            cluster = Cluster(
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                nvlink_gbytes_per_s=args.nvlink_gbytes,
                ib_gbits_per_s=ib,
                link_efficiency=args.efficiency,
                latency_us=args.latency_us,
                peak_tflops=args.peak_tflops,
                mfu=args.mfu,
            )
            rows = model_rows(cluster, workload)
            if not summary:
                print(assumptions(cluster, workload))
            print(
                f"\n{workload.model} on {cluster.nodes} x {cluster.gpus_per_node} A100, network "
                f"{ib:.0f} Gb/s per node, {tokens:,} tokens per GPU per step; seconds per step, "
                f"payloads averaged over T={workload.gap} (one refresh); x ddp = over "
                "ddp-adamw's step in the same column:"
            )
            print(table(rows))
            summary.append((tokens, ib, rows))
            record["runs"].append(
                {"cluster": asdict(cluster), "workload": asdict(workload), "rows": rows}
            )
    if len(summary) > 1:
        print("\nStep time over ddp-adamw's (serial / overlapped), every setting:")
        headers = ["tokens/GPU", "Gb/s"] + [m for m in COMPUTED_SCHEMES if m != DDP_ADAMW]
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
        print(format_table(headers, body))
    record["environment"] = environment()
    write_json(args.json, record)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
