"""``gnlorp-memory``: the estimated peak training memory per GPU of a setup, by component.

    gnlorp-memory --model llama_7b --optimizer gradnormlorp --bits 8 --per-layer \\
        --rank 1024 --tokens 256
    gnlorp-memory --model-config path/to/config.json --tokens 2048 --json

``--json`` prints exactly one JSON object (``total_bytes``, ``<component>_bytes`` for every
component, the moment of the step where the peak is, every candidate moment, notes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from gnlorp_dist.memory.config import DTYPE_BYTES, OPTIMIZERS, PROJ_BITS, MemoryConfig
from gnlorp_dist.memory.estimator import COMPONENTS, MemoryEstimate, estimate_memory
from gnlorp_dist.optim.projection import PROJ_TYPES, SVD_METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gnlorp-memory",
        description="Estimate the peak training memory per GPU (shape arithmetic, no model is "
        "allocated): weights, gradients, optimizer states, projection matrices, activations.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="registered model name, e.g. llama_60m or llama_7b")
    model.add_argument("--model-config", help="a LLaMA config.json (or a folder holding one)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="gradnormlorp")
    parser.add_argument(
        "--bits", type=int, choices=(8, 32), default=None,
        help="optimizer-state bits (default: 8 for adamw8bit, else 32)",
    )  # fmt: skip
    parser.add_argument("--rank", type=int, default=None, help="projection rank (default: recipe)")
    parser.add_argument("--proj-type", choices=PROJ_TYPES, default="std")
    parser.add_argument(
        "--per-layer", action="store_true", help="update each parameter inside backward"
    )
    parser.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument(
        "--tokens", type=int, default=256, help="tokens per micro-batch per GPU (default 256)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="sequence length (default: tokens)"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="weight dtype")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks")
    parser.add_argument(
        "--shard-states", action="store_true", help="optimizer states sharded over the ranks"
    )
    parser.add_argument(
        "--no-refresh", dest="refresh", action="store_false",
        help="peak of a step without a subspace refresh (default: include the SVD workspace)",
    )  # fmt: skip
    parser.add_argument(
        "--proj-bits", type=int, choices=PROJ_BITS, default=16,
        help="bits of the stored projection bases, as gnlorp-train --proj-bits: 16 (the "
        "gradient's dtype), 8 (INT8) or 4 (INT4), with a float32 scale per 128 values",
    )  # fmt: skip
    parser.add_argument(
        "--svd-method", choices=SVD_METHODS, default="auto",
        help="refresh decomposition, as gnlorp-train --svd-method: auto (randomized when the "
        "smaller side is >= 2048, else the full SVD), svd or randomized",
    )  # fmt: skip
    parser.add_argument(
        "--assume-fused-8bit-update", dest="fused_8bit_update", action="store_true",
        help=argparse.SUPPRESS,  # removed: the 8-bit update is chunked now, always modelled
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def config_from_args(args: argparse.Namespace) -> MemoryConfig:
    return MemoryConfig(
        model=args.model or args.model_config,
        optimizer=args.optimizer,
        bits=args.bits,
        rank=args.rank,
        proj_type=args.proj_type,
        per_layer=args.per_layer,
        accumulation_steps=args.accumulation_steps,
        tokens=args.tokens,
        seq_len=args.seq_len,
        dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing,
        world_size=args.world_size,
        shard_states=args.shard_states,
        refresh=args.refresh,
        proj_bits=args.proj_bits,
        svd_method=args.svd_method,
    )


def format_estimate(estimate: MemoryEstimate) -> str:
    """The human-readable report: one row per component, then the total."""
    c = estimate.config
    setup = (
        f"{c.model}: {c.optimizer}, {estimate.config.state_bits}-bit states"
        + (f", rank {estimate.rank} ({c.proj_type})" if estimate.rank else "")
        + (", per-layer updates" if c.per_layer else "")
        + (f", {c.proj_bits}-bit bases" if estimate.rank and c.proj_bits != 16 else "")
        + f", {c.tokens} tokens/micro-batch x {c.accumulation_steps}, {c.dtype} weights"
        + (", activation checkpointing" if c.activation_checkpointing else "")
        + (f", {c.world_size} ranks" if c.world_size > 1 else "")
        + (" (states sharded)" if c.shard_states and c.world_size > 1 else "")
    )
    rows = [(name, estimate.breakdown[name]) for name in COMPONENTS]
    rows.append(("total", estimate.total_bytes))
    width = max(len(name) for name, _ in rows)
    lines = [
        setup,
        f"{estimate.num_parameters:,} parameters; peak at: {estimate.peak_moment}",
        "",
        f"{'component'.ljust(width)}  {'bytes':>16}  {'GiB':>9}  {'GB':>9}",
        f"{'-' * width}  {'-' * 16}  {'-' * 9}  {'-' * 9}",
    ]
    for name, value in rows:
        if name == "total":
            lines.append(f"{'-' * width}  {'-' * 16}  {'-' * 9}  {'-' * 9}")
        lines.append(
            f"{name.ljust(width)}  {value:>16,}  {value / 2**30:>9.3f}  {value / 1e9:>9.3f}"
        )
    lines += [
        "",
        f"full gradient set: {estimate.full_gradient_bytes / 2**30:.3f} GiB; "
        f"saved activations per micro-batch: {estimate.saved_activation_bytes / 2**30:.3f} GiB",
        "breakdown at the peak moment; every moment: --json",
    ]
    lines += [f"note: {note}" for note in estimate.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fused_8bit_update:
        parser.error(
            "--assume-fused-8bit-update was removed: GradNormLoRPAdamW updates 8-bit moments "
            "chunk by chunk (never whole dequantised moments), and the estimator always models "
            "that; drop the flag"
        )
    try:
        estimate = estimate_memory(config_from_args(args))
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        sys.stdout.write(json.dumps(estimate.as_dict()) + "\n")
    else:
        print(format_estimate(estimate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
