"""``gnlorp-memory``: the estimated peak training memory per GPU of a setup, by component.

    gnlorp-memory --model llama_7b --optimizer gradnormlorp --bits 8 --per-layer \\
        --rank 1024 --tokens 256
    gnlorp-memory --model-config path/to/config.json --tokens 2048 --json
    gnlorp-memory --config setup.yaml --world-size 8   # options from a YAML/JSON file, flags win

``--json`` prints exactly one JSON object (``total_bytes``, ``<component>_bytes`` for every
component, the moment of the step where the peak is, every candidate moment, notes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from gnlorp_dist.memory.config import MemoryConfig
from gnlorp_dist.memory.estimator import COMPONENTS, MemoryEstimate, estimate_memory
from gnlorp_dist.options.fields import field_docs
from gnlorp_dist.options.groups import ModelOptions
from gnlorp_dist.options.parser import build_parser as build_options_parser
from gnlorp_dist.options.parser import config_from_namespace, parse_namespace


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`MemoryConfig` field, plus --model-config, --json and --config."""
    parser = build_options_parser(
        MemoryConfig,
        prog="gnlorp-memory",
        description="Estimate the peak training memory per GPU (shape arithmetic, no model is "
        "allocated): weights, gradients, optimizer states, projection matrices, activations.",
    )
    # --model or --model-config (checked in config_from_args, so a --config file may give it).
    model = next(a for a in parser._actions if a.dest == "model")
    model.required = False
    parser.add_argument(
        "--model-config", "--model_config", metavar="PATH",
        help=field_docs(ModelOptions)["model_config"],
    )  # fmt: skip
    parser.add_argument(
        "--assume-fused-8bit-update", dest="fused_8bit_update", action="store_true",
        help=argparse.SUPPRESS,  # removed: the 8-bit update is chunked now, always modelled
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def config_from_args(args: argparse.Namespace) -> MemoryConfig:
    """The :class:`MemoryConfig` of parsed flags; ValueError unless exactly one of --model and
    --model-config names the model."""
    if (args.model is None) == (getattr(args, "model_config", None) is None):
        raise ValueError(
            "name the model with exactly one of --model NAME and --model-config PATH (got "
            f"--model {args.model!r}, --model-config {getattr(args, 'model_config', None)!r})"
        )
    namespace = argparse.Namespace(**{**vars(args), "model": args.model or args.model_config})
    return config_from_namespace(MemoryConfig, namespace)


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
    args = parse_namespace(parser, argv)
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
