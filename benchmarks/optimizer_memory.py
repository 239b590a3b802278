"""Exact training-state bytes of adamw, galore, gradnormlorp and galore-torch on LLaMA shapes.

For every model and method the script reports the bytes of the weights, the gradients, the
optimizer states and the projection matrices. Nothing is a formula: the model is built on the
meta device (real modules, real weight-norm surgery, real parameter groups, no memory), and every
distinct (parameter group, shape) pair is then materialised once on the CPU, given a random
gradient, and stepped once by the real optimizer; the bytes of the tensors the optimizer holds
afterwards are multiplied by the number of parameters of that shape in that group. State size
depends only on shape, dtype and group settings, so this equals a whole-model step; the
``--cross-check`` models are also stepped whole (forward, backward, step) and must agree to the
byte. The measuring code is :mod:`gnlorp_dist.bench.shape_bytes`.

    python -m benchmarks.optimizer_memory                    # llama_60m ... llama_1b, bf16
    python -m benchmarks.optimizer_memory --models llama_60m --dtype fp32
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from gnlorp_dist.bench import shape_bytes
from gnlorp_dist.bench.harness import DTYPES, RESULTS_DIR, environment, write_json
from gnlorp_dist.bench.methods import REFERENCE_METHODS
from gnlorp_dist.models import known_model_names
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

NAME = "optimizer_memory"


@dataclass(frozen=True, kw_only=True)
class OptimizerMemoryConfig:
    """Which models and methods to measure, and how."""

    models: tuple[str, ...] = option(
        ("llama_60m", "llama_130m", "llama_350m", "llama_1b"),
        choices=known_model_names(),
        metavar="MODEL",
    )
    """Model shapes to measure."""
    methods: tuple[str, ...] = option(
        REFERENCE_METHODS, choices=REFERENCE_METHODS, metavar="METHOD"
    )
    """Methods to measure (default: all)."""
    dtype: str = option("bf16", choices=tuple(DTYPES))
    """Weight dtype."""
    layers: int | None = None
    """Override the number of decoder layers (quick runs; totals then differ from the spec)."""
    cross_check: tuple[str, ...] = dataclasses.field(
        default=("llama_60m",), metadata={"metavar": "MODEL", "nargs": "*"}
    )
    """Models also stepped whole to confirm the per-shape totals byte for byte (pass the flag
    alone for none)."""
    cross_check_layers: int = 2
    """Decoder layers of the cross-checked whole model (every distinct shape is there with 2)."""
    threads: int | None = None
    """torch threads (default: all)."""
    workers: int = min(2, os.cpu_count() or 1)
    """Processes measuring shapes in parallel."""
    json: str = option(str(RESULTS_DIR / f"{NAME}.json"), metavar="PATH")
    """Where to write the results."""


def _check(config: OptimizerMemoryConfig) -> None:
    for flag in ("layers", "cross_check_layers"):
        value = getattr(config, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    if config.workers < 1:
        raise ValueError(f"--workers {config.workers} must be >= 1")


def _installed(methods: tuple[str, ...]) -> list[str]:
    """``methods`` without galore-torch when it is not installed (said so)."""
    if "galore-torch" not in methods:
        return list(methods)
    try:
        import galore_torch  # noqa: F401, PLC0415
    except ImportError:
        print("galore-torch is not installed (pip install galore-torch==1.0); skipping it")
        return [m for m in methods if m != "galore-torch"]
    return list(methods)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(
        OptimizerMemoryConfig,
        prog="benchmarks.optimizer_memory",
        description=__doc__.split("\n\n")[0],
    )
    config = config_from_namespace(OptimizerMemoryConfig, parse_namespace(parser, argv))
    _check(config)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    methods = _installed(config.methods)
    started = time.perf_counter()
    results = shape_bytes.run(
        config.models, methods, config.dtype, layers=config.layers, workers=config.workers,
        cross_check_models=config.cross_check, cross_check_layers=config.cross_check_layers,
    )  # fmt: skip
    payload = {
        "benchmark": NAME,
        "environment": environment(),
        "settings": {
            "dtype": config.dtype,
            "models": list(config.models),
            "methods": methods,
            "layers_override": config.layers,
            "cross_check": [n for n in config.models if n in config.cross_check],
            "cross_check_layers": config.cross_check_layers,
            "workers": config.workers,
            "threads": torch.get_num_threads(),
            "measurement": shape_bytes.MEASUREMENT_NOTE,
        },
        "paper_table2_weights_plus_states_G": shape_bytes.PAPER_TABLE2_WEIGHTS_PLUS_STATES_G,
        "results": {r["model"]: r for r in results},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(shape_bytes.tables(results, config.dtype))
    for result in results:
        if "cross_check" in result:
            check = result["cross_check"]
            print(
                f"\ncross-check {result['model']} ({check['num_hidden_layers']} layers): one "
                "whole-model forward/backward/step gives exactly the per-shape bytes for "
                + ", ".join(check["methods"])
            )
    path = write_json(config.json, payload)
    print(f"\nwrote {path} ({payload['seconds']} s)")
    return payload


if __name__ == "__main__":
    main()
