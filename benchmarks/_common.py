"""Shared plumbing of the benchmark scripts: arguments, environment record, tables, JSON, and the
optimizers under comparison built the same way for every script.

Methods (the names every table and JSON file uses):

- ``adamw``: ``torch.optim.AdamW`` on the plain model (the baseline of every ratio);
- ``galore``: :class:`gnlorp_dist.GradNormLoRPAdamW` on the plain model, attention and MLP weights
  projected (weight normalisation off: GaLore's algorithm);
- ``gradnormlorp``: the same optimizer on the weight-normalised model (directions ``V`` projected,
  magnitudes ``m`` dense);
- ``galore-torch``: ``galore_torch.GaLoreAdamW`` (GaLore's own package) with ``galore``'s groups.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.models import ModelSpec

RESULTS_DIR = Path(__file__).resolve().parent / "results"

METHODS: tuple[str, ...] = ("adamw", "galore", "gradnormlorp", "galore-torch")
"""Every method a benchmark knows, in table order."""

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

# State keys that hold a projection matrix rather than an optimizer moment: ours keeps the basis
# under "proj", galore-torch inside a GaLoreProjector object under "projector".
_PROJ_STATE_KEY = "proj"
_GALORE_TORCH_PROJECTOR_KEY = "projector"


# -- arguments and output ------------------------------------------------------------------------


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    """``--json PATH`` (default ``benchmarks/results/<name>.json``)."""
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help=f"where to write the results (default: benchmarks/results/{name}.json)",
    )


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise ValueError(f"--dtype {text!r} is not supported; use one of {list(DTYPES)}")
    return DTYPES[text]


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What a reader needs to compare two result files: versions, CPU, threads, date."""
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "galore_torch": _version("galore-torch"),
        "gnlorp_dist": _version("gnlorp-dist"),
        "cuda_available": torch.cuda.is_available(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A fixed-width table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def gib(num_bytes: int) -> float:
    return num_bytes / 2**30


def median_mean(samples: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "mean": statistics.fmean(samples),
        "min": min(samples),
        "n": len(samples),
    }


# -- the optimizers under comparison ------------------------------------------------------------


def prepare_model(model: nn.Module, method: str) -> nn.Module:
    """``model`` as ``method`` trains it: weight-normalised (in place) for ``gradnormlorp``."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; use one of {METHODS}")
    if method == "gradnormlorp":
        apply_weight_norm(model)
    return model


def param_groups(model: nn.Module, method: str, spec: ModelSpec) -> list[dict[str, Any]]:
    """The parameter groups ``method`` gives its optimizer, at the spec's rank, T and alpha."""
    if method == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params}]
    return projected_param_groups(
        model, rank=spec.rank, update_proj_gap=spec.update_proj_gap, scale=spec.scale
    )


def make_optimizer(
    method: str, groups: list[dict[str, Any]], lr: float = 1e-3
) -> torch.optim.Optimizer:
    """The optimizer of ``method`` over ``groups``; every one uses the same lr, betas and eps
    defaults (``eps=1e-6`` as GaLore; weight decay 0)."""
    if method == "adamw":
        # foreach=False: the per-tensor loop the projected optimizers also run, and no grouped
        # temporaries in the memory measurement.
        return torch.optim.AdamW(groups, lr=lr, eps=1e-6, weight_decay=0.0, foreach=False)
    if method in ("galore", "gradnormlorp"):
        return GradNormLoRPAdamW(groups, lr=lr, eps=1e-6, weight_decay=0.0)
    if method == "galore-torch":
        from galore_torch import GaLoreAdamW

        # galore-torch passes unknown group keys through; param_names is only a label.
        return GaLoreAdamW(groups, lr=lr, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True)
    raise ValueError(f"method {method!r} is not known; use one of {METHODS}")


def state_tensor_bytes(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[int, int]:
    """``(state bytes, projection-matrix bytes)`` that ``optimizer`` holds for ``param``.

    State bytes are every tensor in the parameter's state (moments, and ``torch.optim.AdamW``'s
    step counter, a 4-byte tensor) except the projection matrix, counted separately. Python
    numbers (the projected optimizers' step counters) take no tensor memory and count 0.
    """
    state = optimizer.state.get(param, {})
    state_bytes = proj_bytes = 0
    for key, value in state.items():
        if key == _PROJ_STATE_KEY and isinstance(value, torch.Tensor):
            proj_bytes += value.nbytes
        elif key == _GALORE_TORCH_PROJECTOR_KEY:
            basis = value.ortho_matrix
            bases = basis if isinstance(basis, (list, tuple)) else [basis]
            proj_bytes += sum(b.nbytes for b in bases if b is not None)
        elif isinstance(value, torch.Tensor):
            state_bytes += value.nbytes
    return state_bytes, proj_bytes
