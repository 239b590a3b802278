"""Modelled step time of LLaMA 7B on 8 nodes x 4 A100: DDP + AdamW, ZeRO-2 + AdamW, the baselines
that hold 7B on an 80 GB A100 (FSDP2 + AdamW, ZeRO-3 + AdamW), GradNormLoRP uncompressed and
with low-rank gradient communication, and the low-rank mode with its directions overlapped with
the next forward (opt-in: ``optimizer.applying_directions_in_forward(model)``). A simulation: nothing here runs on a cluster,
and every figure it prints is modelled from the assumptions it prints with it. It ends with a
sweep of the network from 25 to 400 Gb/s and issue #23's targets, each printed met or not.

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
  overlap row is what they would give;
- **FSDP2 + AdamW and ZeRO-3 + AdamW** (:mod:`gnlorp_dist.bench.scale_baselines`): each moves
  about 3x the weights per step (all-gather in forward, again in backward, reduce-scatter of the
  gradients), from the same shapes and priced the same way; their overlap is one schedule per
  pass: the next piece's all-gather prefetched during a piece's compute, its reduce-scatter
  overlapping the next piece's backward, both sharing the network link;
- **ours, directions overlapped with the next forward** (opt-in, ``applying_directions_in_
  forward``; otherwise the broadcasts finish inside ``step()``): the same schedule hides each
  layer's share of the post-step broadcasts behind the next forward.

Not modelled: the AdamW update's memory traffic (DDP + AdamW updates all 6.7B parameters on
every GPU; the others a 1/N share), activation memory, stragglers, congestion between jobs.
DDP + AdamW at 7B holds 16 bytes per parameter (108 GB) on each GPU: it does not fit an 80 GB
A100 and is here as the communication baseline only.

The model is :mod:`gnlorp_dist.bench.scale`, :mod:`gnlorp_dist.bench.scale_baselines` and
:mod:`gnlorp_dist.bench.scale_sweep`.

Usage::

    python -m benchmarks.scale_model
    python -m benchmarks.scale_model --ib-gbps 400 --mfu 0.4 --tokens-per-gpu 4096
    python -m benchmarks.scale_model --sweep-gbps 10 25 100 200 400
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gnlorp_dist.bench.harness import RESULTS_DIR, environment, write_json
from gnlorp_dist.bench.scale import (
    Cluster,
    Workload,
    assumptions,
    collective_seconds,
    model_rows,
    step_model,
    summary_table,
    table,
)
from gnlorp_dist.bench.scale_sweep import SWEEP_GBPS, check_targets, sweep_table, targets_text
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

__all__ = ["Cluster", "Workload", "collective_seconds", "main", "step_model"]
_C, _W = Cluster(), Workload()


@dataclass(frozen=True, kw_only=True)
class ScaleModelConfig:
    """The cluster and the workload of the model (lists: one table per combination)."""

    nodes: int = _C.nodes
    """Nodes."""
    gpus_per_node: int = _C.gpus_per_node
    """GPUs used per node."""
    nvlink_gbytes: float = _C.nvlink_gbytes_per_s
    """NVLink GB/s per GPU each way."""
    ib_gbps: tuple[float, ...] = option((_C.ib_gbits_per_s,), metavar="GBPS")
    """Network Gb/s per node each way (several: one table each)."""
    efficiency: float = _C.link_efficiency
    """Fraction of a link's rate NCCL reaches."""
    latency_us: float = _C.latency_us
    """Fixed microseconds per collective."""
    peak_tflops: float = _C.peak_tflops
    """A GPU's dense bf16 peak TFLOP/s."""
    mfu: float = _C.mfu
    """Model FLOPs utilisation: the fraction of the peak a training step reaches."""
    model: str = option(_W.model, metavar="NAME")
    """A named LLaMA shape (its parameter shapes give the payloads)."""
    rank: int = _W.rank
    """Projection rank."""
    gap: int = _W.gap
    """Refresh gap T (payloads are averaged over it)."""
    tokens_per_gpu: tuple[int, ...] = option((_W.tokens_per_gpu,), metavar="TOKENS")
    """Tokens per GPU per step (several: one table each)."""
    svd_s: float = _W.svd_s_per_matrix
    """Seconds of one refresh SVD of a matrix on its owner GPU (an assumption)."""
    sweep_gbps: tuple[float, ...] = option(SWEEP_GBPS, metavar="GBPS")
    """Network Gb/s of the link sweep and the targets (one sweep per --tokens-per-gpu)."""
    json: str = option(str(RESULTS_DIR / "scale_model.json"), metavar="PATH")
    """Where to write the results."""


def _cluster(config: ScaleModelConfig, ib: float) -> Cluster:
    return Cluster(
        nodes=config.nodes, gpus_per_node=config.gpus_per_node,
        nvlink_gbytes_per_s=config.nvlink_gbytes, ib_gbits_per_s=ib,
        link_efficiency=config.efficiency, latency_us=config.latency_us,
        peak_tflops=config.peak_tflops, mfu=config.mfu,
    )  # fmt: skip


def _main_tables(config: ScaleModelConfig, record: dict[str, Any]) -> None:
    """One table per (tokens per GPU, network Gb/s), then the summary over them."""
    summary = []
    for tokens in config.tokens_per_gpu:
        workload = _workload(config, tokens)
        for ib in config.ib_gbps:
            cluster = _cluster(config, ib)
            rows = model_rows(cluster, workload)
            if not summary:
                print(assumptions(cluster, workload))
            print(
                f"\nMODELLED: {workload.model} on {cluster.nodes} x {cluster.gpus_per_node} A100, "
                f"network {ib:.0f} Gb/s per node, {tokens:,} tokens per GPU per step; seconds "
                f"per step, payloads averaged over T={workload.gap} (one refresh); x ddp = over "
                "ddp-adamw's step in the same column:"
            )
            print(table(rows))
            summary.append((tokens, ib, rows))
            record["runs"].append(
                {"cluster": asdict(cluster), "workload": asdict(workload), "rows": rows}
            )
    if len(summary) > 1:
        print("\nMODELLED: step time over ddp-adamw's (serial / overlapped), every setting:")
        print(summary_table(summary))


def _sweep(config: ScaleModelConfig, record: dict[str, Any]) -> None:
    """The link sweep and the targets, one per tokens-per-GPU setting."""
    for tokens in config.tokens_per_gpu:
        workload = _workload(config, tokens)
        sweep = [(ib, model_rows(_cluster(config, ib), workload)) for ib in config.sweep_gbps]
        print(
            f"\nMODELLED: link sweep, {workload.model}, {tokens:,} tokens per GPU; overlapped "
            "step in seconds, and ours over each baseline (below 1: ours faster; next-fwd = "
            "directions overlapped with the next forward, opt-in):"
        )
        print(sweep_table(sweep))
        results = check_targets(sweep)
        print()
        print(targets_text(results, tokens))
        record["sweeps"].append(
            {
                "tokens_per_gpu": tokens,
                "gbps": list(config.sweep_gbps),
                "rows": [rows for _, rows in sweep],
                "targets": results,
            }
        )


def _workload(config: ScaleModelConfig, tokens: int) -> Workload:
    return Workload(
        model=config.model, rank=config.rank, gap=config.gap, tokens_per_gpu=tokens,
        svd_s_per_matrix=config.svd_s,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        ScaleModelConfig, prog="benchmarks.scale_model", description=__doc__.splitlines()[0]
    )
    config = config_from_namespace(ScaleModelConfig, parse_namespace(parser, argv))
    record: dict[str, Any] = {"benchmark": "scale_model", "modelled": True, "runs": []}
    record["sweeps"] = []
    _main_tables(config, record)
    _sweep(config, record)
    record["environment"] = environment()
    write_json(config.json, record)
    print(f"wrote {config.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
