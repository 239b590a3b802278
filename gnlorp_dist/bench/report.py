"""Tables, curve comparisons and the JSON record of a benchmark run."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A fixed-width table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """``max_i |a_i - b_i| / |b_i|`` over the steps both curves have."""
    pairs = list(zip(a, b))
    if not pairs:
        return math.nan
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def comparison_table(
    results: dict[str, dict[str, Any]], loss_window: int, cuda: bool = False
) -> str:
    """One row per method: final loss, perplexity, state bytes, peak memory, time vs AdamW;
    with ``cuda`` the peak is the GPU's (allocated) and tokens/s and peak memory are also given
    as ratios to AdamW."""
    base = results.get("adamw")
    rows = []
    for label, r in results.items():
        memory = r.get("memory")
        states = r["optimizer_state_bytes"]
        ratio = r.get("time_ratio_to_adamw")
        row = [
            label,
            _num(r["final_train_loss"], ".4f"),
            _num(r["eval_perplexity"], ".2f"),
            f"{states / MIB:.2f}",
            f"{states / base['optimizer_state_bytes']:.3f}" if base else "-",
            f"{r['target_state_bytes'] / MIB:.3f}",
            "-" if not memory else f"{memory['peak_bytes'] / MIB:.1f}",
        ]
        if cuda:
            row += [
                _num(r.get("peak_memory_ratio_to_adamw"), ".3f"),
                _num(r.get("tokens_per_s"), ",.0f"),
                _num(r.get("tokens_per_s_ratio_to_adamw"), ".3f"),
            ]
        rows.append(row + [_num(ratio, ".3f")])
    headers = [
        "method",
        f"train loss (last {loss_window})",
        "eval ppl",
        "opt. state MiB",
        "x adamw",
        "targets' state MiB",
        "peak GPU MiB" if cuda else "peak MiB",
    ]
    if cuda:
        headers += ["peak x adamw", "tokens/s", "tokens/s x adamw"]
    return format_table(headers + ["time/step x adamw"], rows)


def sweep_table(results: dict[str, dict[str, Any]], setting: str, loss_window: int) -> str:
    """One row per (method, value); granular methods' rows also give c and r (``c x r``)."""
    granular = any("granularity" in r for r in results.values())
    rows = [
        [
            r["method"],
            r["sweep_value"],
            *(
                [f"{r['granularity']} x {r['vlorp_rank']}" if "granularity" in r else "-"]
                if granular
                else []
            ),
            _num(r["final_train_loss"], ".4f"),
            _num(r["eval_perplexity"], ".2f"),
            f"{r['optimizer_state_bytes'] / MIB:.2f}",
            f"{r['target_state_bytes'] / MIB:.3f}",
        ]
        for r in results.values()
    ]
    return format_table(
        [
            "method",
            setting,
            *(["c x r"] if granular else []),
            f"train loss (last {loss_window})",
            "eval ppl",
            "opt. state MiB",
            "targets' state MiB",
        ],
        rows,
    )


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
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            name: _version(name)
            for name in (
                "torch",
                "transformers",
                "gnlorp-dist",
                "galore-torch",
                "peft",
                "bitsandbytes",
                "matplotlib",
            )
        },
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN (a diverged method) is not JSON; write null instead.
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
