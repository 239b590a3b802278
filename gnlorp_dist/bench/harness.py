"""The one benchmark harness: what ``gnlorp-bench`` and every script in ``benchmarks/`` share.

- the record of a run: :func:`environment` (versions, CPU, threads, date) and :func:`write_json`
  (NaN and infinities written as null), by default under :data:`RESULTS_DIR`;
- fixed-width tables (:func:`format_table`) and byte units (:func:`gib`);
- timing: :func:`median_mean` of a list of durations.

Their flags come from :mod:`gnlorp_dist.options.parser`, like every command line's.

The scripts in ``benchmarks/`` run from the repository root as modules
(``python -m benchmarks.optimizer_memory``), so they import ``gnlorp_dist`` and each other
without touching ``sys.path``. The methods they compare come from the one registry,
:mod:`gnlorp_dist.bench.methods`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path("benchmarks") / "results"
"""Where results go by default (git-ignored), relative to the repository root."""
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
VERSIONS = (
    "torch",
    "transformers",
    "gnlorp-dist",
    "galore-torch",
    "peft",
    "bitsandbytes",
    "deepspeed",
    "matplotlib",
)
"""Distributions whose versions a result records."""


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
        "cuda_available": torch.cuda.is_available(),
        "versions": {name: _version(name) for name in VERSIONS},
    }


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``payload`` as JSON at ``path`` (folders created); a diverged run's NaN is written null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=1) + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
    """Median, mean, fastest and count of a list of durations (or any samples)."""
    return {
        "median": statistics.median(samples),
        "mean": statistics.fmean(samples),
        "min": min(samples),
        "n": len(samples),
    }
