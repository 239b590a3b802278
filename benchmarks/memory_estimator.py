"""The memory estimator held against measured memory, per-layer updates against the normal path,
and the 7B single-GPU answer next to the paper's.

(a) For each model and setting: the estimator's peak (shape arithmetic, ``gnlorp-memory``) and
    the measured peak of one real steady-state training step on the CPU: exact live-tensor
    accounting (every tensor an aten operator produces, counted once per storage until it is
    freed; :mod:`gnlorp_dist.memory.accounting`). On a GPU also ``torch.cuda.max_memory_allocated``.
    The tracked step refreshes the subspaces (``update_proj_gap=1``): the peak of a run.
(b) Per-layer updates against the normal path: backward-phase peak, whole-step peak, peak live
    ``.grad`` bytes, against the size of the full gradient set.
(c) LLaMA 7B, 8-bit GradNormLoRP, per-layer, rank 1024, 256 tokens per GPU, bf16 weights:
    the estimate next to the paper's 20.07 GB and GaLore's 22.72 GB, and its variants.
(d) The 7B recipe step by step: the chunked 8-bit update, weight norm without x·Vᵀ, randomized
    refresh, INT8 then INT4 bases, activation checkpointing; each step's saving. Its first row is
    not computed: it is the old estimate as recorded before issue 14 (22.165 GiB; the code that
    gave it is gone), marked "recorded" in the table's source column; every other row is
    computed by ``estimate_memory`` now ("computed").

    python -m benchmarks.memory_estimator            # about 3 minutes on 2 CPU cores
    python -m benchmarks.memory_estimator --quick    # llama_nano and llama_micro only
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from gnlorp_dist.bench.harness import RESULTS_DIR, environment, format_table, write_json
from gnlorp_dist.memory import MemoryConfig, estimate_memory, measure_config
from gnlorp_dist.memory.arithmetic import DTYPE_BYTES, cached_model_shape
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

NAME = "memory_estimator"
MIB = 2**20

# (model, tokens): the third model runs short sequences to keep the CPU run short.
VALIDATION_MODELS = (("llama_nano", 256), ("llama_micro", 256), ("llama_60m", 128))
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32 32-bit normal": dict(dtype="fp32", bits=32, per_layer=False),
    "fp32 32-bit per-layer": dict(dtype="fp32", bits=32, per_layer=True),
    "fp32 8-bit normal": dict(dtype="fp32", bits=8, per_layer=False),
    "fp32 8-bit per-layer": dict(dtype="fp32", bits=8, per_layer=True),
    "fp32 per-layer ckpt x2": dict(
        dtype="fp32", bits=32, per_layer=True, activation_checkpointing=True, accumulation_steps=2
    ),
    "bf16 32-bit per-layer": dict(dtype="bf16", bits=32, per_layer=True),
    "fp32 8-bit per-layer INT4 bases": dict(dtype="fp32", bits=8, per_layer=True, proj_bits=4),
    "fp32 8-bit normal INT8 bases, randomized": dict(
        dtype="fp32", bits=8, per_layer=False, proj_bits=8, svd_method="randomized"
    ),
}
BF16_MODELS = ("llama_nano",)  # bf16 matmuls are slow on CPU; one model shows the dtype terms
DROP_TOKENS = 32  # (b): few tokens, so gradients (not logits) dominate the backward pass

PAPER_7B_GB = 20.07  # GradNormLoRP paper, Figure 1 (left): 8-bit, 256 tokens per GPU
GALORE_7B_GB = 22.72  # GaLore's 8-bit per-layer figure the issue quotes
SEVEN_B = MemoryConfig(
    model="llama_7b", optimizer="gradnormlorp", bits=8, per_layer=True, rank=1024, tokens=256
)
SEVEN_B_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("as specified (the issue's call)", {}),
    ("no subspace refresh in the step", dict(refresh=False)),
    ("full SVD refresh (svd_method svd)", dict(svd_method="svd")),
    ("proj_type reverse_std", dict(proj_type="reverse_std")),
    ("128 tokens per GPU", dict(tokens=128)),
    ("activation checkpointing", dict(activation_checkpointing=True)),
    ("INT8 bases (proj_bits 8)", dict(proj_bits=8)),
    ("INT4 bases (proj_bits 4)", dict(proj_bits=4)),
    ("recipe: checkpointing + INT8 bases", dict(activation_checkpointing=True, proj_bits=8)),
    ("checkpointing + INT4 bases", dict(activation_checkpointing=True, proj_bits=4)),
    (
        "the paper's math exactly: full SVD, bf16 bases, checkpointing",
        dict(svd_method="svd", activation_checkpointing=True),
    ),
    ("normal path (no per-layer)", dict(per_layer=False)),
    ("galore (weight norm off), 8-bit, per-layer", dict(optimizer="galore")),
    ("adamw8bit (bitsandbytes), no projection", dict(optimizer="adamw8bit", per_layer=False)),
)

OLD_7B_GIB = 22.165
"""RECORDED, not computed: the issue's 7B call as ``estimate_memory`` gave it before the chunked
8-bit update and the weight-norm change (whole 8-bit moments dequantised to float32 in lm_head's
update, 1.955 GiB, and the pre-scale product x·Vᵀ saved by every weight-normalised linear); the
code that gave it is gone. Source: :data:`OLD_7B_SOURCE`."""
OLD_7B_COMMIT = "1aae57a"
OLD_7B_SOURCE = f"docs/memory.md at {OLD_7B_COMMIT} ('ours, as specified': 23.80 GB, 22.16 GiB)"
"""Where :data:`OLD_7B_GIB` was recorded (the commit before the recipe table of 0f0388e)."""
RECIPE_STEPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("+ chunked (fused) 8-bit update", dict(svd_method="svd")),
    ("+ weight norm without x·Vᵀ", dict(svd_method="svd")),
    ("+ randomized refresh (svd_method auto)", {}),
    ("+ INT8 bases (proj_bits 8)", dict(proj_bits=8)),
    ("+ activation checkpointing: the recipe", dict(proj_bits=8, activation_checkpointing=True)),
    ("INT4 bases instead (proj_bits 4)", dict(proj_bits=4, activation_checkpointing=True)),
)
"""The 7B recipe, one change at a time from the recorded baseline (cumulative)."""


def _old_weight_norm_outputs(config: MemoryConfig) -> int:
    """What the weight-norm linears saved before 3ff96f8: their pre-scale outputs x·Vᵀ, tokens x
    (q + k + v + o + gate + up + down outputs) per layer in the weight dtype."""
    shape = cached_model_shape(config.model, True)
    q_dim = shape.heads * shape.head_dim
    kv_dim = shape.kv_heads * shape.head_dim
    outs = q_dim + 2 * kv_dim + 2 * shape.hidden + 2 * shape.intermediate
    return shape.layers * config.tokens * DTYPE_BYTES[config.dtype] * outs


def recipe_steps() -> list[dict[str, Any]]:
    """Each step's peak and saving. The first one keeps the old weight norm: x·Vᵀ is added back
    to every moment that still holds the decoder layers' activations (all but the embedding's
    update at the end of the backward pass)."""
    rows = [
        dict(step="the issue's call, old estimate", source=f"recorded at {OLD_7B_COMMIT}",
             total_bytes=round(OLD_7B_GIB * 2**30), peak_moment="lm_head_update",
             saving_gib=None, fields=None)
    ]  # fmt: skip
    for index, (label, fields) in enumerate(RECIPE_STEPS):
        config = replace(SEVEN_B, **fields)
        estimate = estimate_memory(config)
        totals = {name: sum(live.values()) for name, live in estimate.moments.items()}
        if index == 0:
            extra = _old_weight_norm_outputs(config)
            totals = {
                name: total + (extra if name != "embedding_update" else 0)
                for name, total in totals.items()
            }
        peak = max(totals, key=totals.__getitem__)
        previous = rows[-1]["total_bytes"]
        rows.append(
            dict(
                step=label,
                source="computed",
                total_bytes=totals[peak],
                peak_moment=peak,
                saving_gib=(previous - totals[peak]) / 2**30,
                fields=fields,
                breakdown=estimate.breakdown if index else None,
            )
        )
    return rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def validate(models: tuple[tuple[str, int], ...]) -> list[dict[str, Any]]:
    rows = []
    for model, tokens in models:
        for setting, fields in SETTINGS.items():
            if fields["dtype"] == "bf16" and model not in BF16_MODELS:
                continue
            config = MemoryConfig(model=model, tokens=tokens, **fields)
            start = time.perf_counter()
            estimate = estimate_memory(config)
            measured = measure_config(config, device=_device())
            rows.append(
                dict(
                    model=model,
                    setting=setting,
                    tokens=tokens,
                    estimated_bytes=estimate.total_bytes,
                    estimated_moment=estimate.peak_moment,
                    measured_bytes=measured.peak_bytes,
                    measured_at=f"{measured.peak_phase}/{measured.peak_op}",
                    relative_error=(estimate.total_bytes - measured.peak_bytes)
                    / measured.peak_bytes,
                    estimated_saved_activation_bytes=estimate.saved_activation_bytes,
                    measured_saved_activation_bytes=measured.saved_activation_bytes,
                    cuda_max_memory_allocated=measured.cuda_max_memory_allocated,
                    estimated_breakdown=estimate.breakdown,
                    measured_breakdown=measured.breakdown,
                    measured=measured.as_dict(),
                    seconds=round(time.perf_counter() - start, 1),
                )
            )
            print(f"  measured {model} {setting}: {rows[-1]['seconds']} s", flush=True)
    return rows


def per_layer_drop(
    models: tuple[tuple[str, int], ...], validation: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Normal path vs per-layer (fp32, 32-bit) at the validation tokens (reused) and at
    :data:`DROP_TOKENS`, where gradients rather than logits dominate."""
    rows = []
    for model, tokens in models:
        for count in (DROP_TOKENS, tokens):
            base = MemoryConfig(model=model, tokens=count, dtype="fp32", bits=32)
            pair = []
            for per_layer in (False, True):
                config = replace(base, per_layer=per_layer)
                measured = (
                    _reuse(validation, model, count, per_layer)
                    or measure_config(config, device=_device()).as_dict()
                )
                pair.append(measured)
            normal, layered = pair
            rows.append(
                dict(
                    model=model,
                    tokens=count,
                    full_gradient_bytes=normal["full_gradient_bytes"],
                    normal_backward_peak=normal["phase_peaks"]["backward"],
                    per_layer_backward_peak=layered["phase_peaks"]["backward"],
                    normal_step_peak=normal["peak_bytes"],
                    per_layer_step_peak=layered["peak_bytes"],
                    normal_peak_grad_bytes=normal["peak_gradient_bytes"],
                    per_layer_peak_grad_bytes=layered["peak_gradient_bytes"],
                    estimated_drop=estimate_memory(base).total_bytes
                    - estimate_memory(replace(base, per_layer=True)).total_bytes,
                    per_layer_peak_at=f"{layered['peak_phase']}/{layered['peak_op']}",
                )
            )
    return rows


def _reuse(validation, model: str, tokens: int, per_layer: bool) -> dict[str, Any] | None:
    setting = "fp32 32-bit per-layer" if per_layer else "fp32 32-bit normal"
    for row in validation:
        if (row["model"], row["tokens"], row["setting"]) == (model, tokens, setting):
            return row["measured"]
    return None


def seven_b() -> list[dict[str, Any]]:
    rows = []
    for label, fields in SEVEN_B_VARIANTS:
        estimate = estimate_memory(replace(SEVEN_B, **fields))
        rows.append(
            dict(
                variant=label,
                total_bytes=estimate.total_bytes,
                peak_moment=estimate.peak_moment,
                breakdown=estimate.breakdown,
                fields=fields,
            )
        )
    return rows


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / MIB:.2f}"


def print_tables(validation, drops, sevens, steps) -> None:
    print("\n(a) estimator vs measured peak (live tensor bytes, one refresh step on the CPU)\n")
    headers = ["model", "setting", "tokens", "est MiB", "meas MiB", "error", "est moment",
               "measured at", "saved act est/meas MiB"]  # fmt: skip
    if any(r["cuda_max_memory_allocated"] for r in validation):
        headers.append("cuda max alloc MiB")
    table = []
    for r in validation:
        row = [r["model"], r["setting"], r["tokens"], _mib(r["estimated_bytes"]),
               _mib(r["measured_bytes"]), f"{100 * r['relative_error']:+.3f}%",
               r["estimated_moment"], r["measured_at"],
               f"{_mib(r['estimated_saved_activation_bytes'])}/"
               f"{_mib(r['measured_saved_activation_bytes'])}"]  # fmt: skip
        if len(headers) > len(row):
            row.append(_mib(r["cuda_max_memory_allocated"] or 0))
        table.append(row)
    print(format_table(headers, table))

    print("\n(b) per-layer updates vs the normal path (fp32, 32-bit, measured)\n")
    headers = ["model", "tokens", "full grad MiB", "bwd peak normal", "bwd peak per-layer",
               "bwd drop / full grad", "step peak normal", "step peak per-layer",
               "step drop / full grad", "est step drop / full grad", "peak .grad normal",
               "peak .grad per-layer"]  # fmt: skip
    table = []
    for r in drops:
        full = r["full_gradient_bytes"]
        bwd_drop = r["normal_backward_peak"] - r["per_layer_backward_peak"]
        step_drop = r["normal_step_peak"] - r["per_layer_step_peak"]
        table.append([r["model"], r["tokens"], _mib(full), _mib(r["normal_backward_peak"]),
                      _mib(r["per_layer_backward_peak"]), f"{bwd_drop / full:.3f}",
                      _mib(r["normal_step_peak"]), _mib(r["per_layer_step_peak"]),
                      f"{step_drop / full:.3f}", f"{r['estimated_drop'] / full:.3f}",
                      _mib(r["normal_peak_grad_bytes"]),
                      _mib(r["per_layer_peak_grad_bytes"])])  # fmt: skip
    print(format_table(headers, table))

    print(
        "\n(c) LLaMA 7B, 8-bit GradNormLoRP, per-layer, rank 1024, 256 tokens/GPU, bf16 weights\n"
    )
    headers = ["variant", "GB (1e9)", "GiB", "peak moment", "vs paper 20.07", "vs GaLore 22.72"]
    table = [
        ["paper: GradNormLoRP 8-bit", f"{PAPER_7B_GB:.2f}", "", "", "", ""],
        ["GaLore paper: 8-bit per-layer", f"{GALORE_7B_GB:.2f}", "", "", "", ""],
    ]
    for r in sevens:
        gb = r["total_bytes"] / 1e9
        table.append([r["variant"], f"{gb:.2f}", f"{r['total_bytes'] / 2**30:.2f}",
                      r["peak_moment"], f"{gb - PAPER_7B_GB:+.2f}",
                      f"{gb - GALORE_7B_GB:+.2f}"])  # fmt: skip
    print(format_table(headers, table))
    base = sevens[0]["breakdown"]
    print("\n7B breakdown at the peak (as specified):")
    print(format_table(["component", "GB (1e9)", "GiB"],
                       [[k, f"{v / 1e9:.3f}", f"{v / 2**30:.3f}"] for k, v in base.items()]))  # fmt: skip

    print("\n(d) the 7B recipe step by step (cumulative; GiB = 2^30 bytes)\n")
    headers = ["step", "source", "GiB", "GB (1e9)", "saving GiB", "peak moment"]
    table = [
        [r["step"], r["source"], f"{r['total_bytes'] / 2**30:.3f}",
         f"{r['total_bytes'] / 1e9:.3f}",
         "" if r["saving_gib"] is None else f"{r['saving_gib']:.3f}", r["peak_moment"]]
        for r in steps
    ]  # fmt: skip
    print(format_table(headers, table))
    print(
        "recorded: the estimate before issue 14 as it was recorded (not recomputed; its GB is "
        f"the GiB converted; source {OLD_7B_SOURCE}); computed: estimate_memory now"
    )
    recipe = steps[-2]["breakdown"]
    print("\n7B recipe breakdown at the peak (INT8 bases, checkpointing):")
    print(format_table(["component", "GB (1e9)", "GiB"],
                       [[k, f"{v / 1e9:.3f}", f"{v / 2**30:.3f}"] for k, v in recipe.items()]))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MemoryEstimatorConfig:
    """How much of the validation to run, and where the results go."""

    quick: bool = False
    """llama_nano and llama_micro only."""
    json: str = option(str(RESULTS_DIR / f"{NAME}.json"), metavar="PATH")
    """Where to write the results."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        MemoryEstimatorConfig, prog=f"benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    args = config_from_namespace(MemoryEstimatorConfig, parse_namespace(parser, argv))
    torch.manual_seed(0)
    # Memory does not depend on threads; the SVDs of small matrices run ~100x faster on one
    # thread than on two OpenMP threads of a busy 2-core machine.
    torch.set_num_threads(1)
    models = VALIDATION_MODELS[:2] if args.quick else VALIDATION_MODELS
    start = time.perf_counter()
    validation = validate(models)
    drops = per_layer_drop(models, validation)
    sevens = seven_b()
    steps = recipe_steps()
    print_tables(validation, drops, sevens, steps)
    path = write_json(
        args.json,
        {
            "benchmark": NAME,
            "environment": environment(),
            "settings": {
                "device": _device(),
                "measurement": "live tensor storage bytes at every aten operator boundary "
                "(TorchDispatchMode; each storage counted once until freed), one steady-state "
                "training step after one warm-up step, update_proj_gap=1 (the step refreshes)",
                "paper_7b_gb": PAPER_7B_GB,
                "galore_7b_gb": GALORE_7B_GB,
            },
            "validation": validation,
            "per_layer_drop": drops,
            "llama_7b": sevens,
            "llama_7b_recipe_steps": steps,
            "seconds": round(time.perf_counter() - start, 1),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
