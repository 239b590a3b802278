"""The machine and the training step the scale model prices (:mod:`.scale`), and the price of
one collective on its two levels (NVLink inside a node, the network between nodes)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # DeepSpeed ZeRO-3's defaults: stage3_prefetch_bucket_size, reduce_bucket_size and
    # stage3_max_reuse_distance (elements).
    zero3_prefetch_elements: float = 5e7
    zero3_reduce_bucket_elements: float = 5e8
    zero3_reuse_distance: float = 1e9


def collective_seconds(op: str, payload: float, cluster: Cluster) -> float:
    """Bandwidth time of ``op`` on ``payload`` bytes (no latency): NVLink level, then network."""
    if payload <= 0:
        return 0.0
    g, n = cluster.gpus_per_node, cluster.nodes
    factor = 2.0 if op == "all_reduce" else 1.0
    intra = factor * (g - 1) / g * payload / (cluster.nvlink_gbytes_per_s * 1e9)
    inter = factor * (n - 1) / n * payload / (cluster.ib_gbits_per_s / 8 * 1e9)
    return (intra + inter) / cluster.link_efficiency
