"""gnlorp-bench's tables and curve comparisons (the table, JSON and environment helpers are the
harness's, :mod:`gnlorp_dist.bench.harness`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gnlorp_dist.bench.harness import format_table

MIB = 2**20


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
