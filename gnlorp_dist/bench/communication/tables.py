"""The communication benchmark's printed tables and the sentences around them (MiB = 2**20
bytes; ratios to ``ddp-adamw`` with three decimals)."""

from __future__ import annotations

from typing import Any

from gnlorp_dist.bench.communication.schemes import MIB
from gnlorp_dist.bench.harness import format_table

COMPUTED_HEADERS = (
    "model",
    "r",
    "T",
    "method",
    "AR MiB",
    "reduce+a2a MiB",
    "bcast MiB",
    "allgather MiB",
    "r-scatter MiB",
    "wire/rank MiB",
    "x ddp plain",
    "refresh wire MiB",
    "wire avg@T MiB",
    "x ddp avg@T",
)
MEASURED_HEADERS = (
    "model",
    "N",
    "method",
    "AR MiB",
    "reduce+a2a MiB",
    "bcast MiB",
    "allgather MiB",
    "lo MiB/step",
    "x ddp",
    "lo/expected",
    "refresh lo MiB",
    "lo avg@T MiB",
    "x ddp",
    "ring avg@T x ddp",
)
COMPUTED_LEGEND = (
    "Computed from shapes (no run): payload per rank per plain step by collective; wire/rank ="
    " ring model (all-reduce 2(N-1)/N S, reduce/broadcast/all-gather (N-1)/N S); avg@T ="
    " (refresh + (T-1) plain)/T; x ddp = over ddp-adamw's wire bytes (independent of N)."
)


def mib(value: float) -> str:
    return f"{value / MIB:,.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def computed_table(rows: list[dict[str, Any]]) -> str:
    """One line per computed row: the plain step's payload by kind, wire bytes per rank (plain,
    refresh, average at T) and the ratios to ``ddp-adamw``."""
    body = []
    for row in rows:
        p = row["payload_plain"]
        body.append(
            [
                row["model"],
                row["rank"],
                row["gap"],
                row["method"],
                mib(p["all_reduce"]),
                mib(p["reduce"] + p["all_to_all"]),
                mib(p["broadcast"]),
                mib(p["all_gather"]),
                mib(p["reduce_scatter"]),
                mib(row["wire_per_rank_plain"]),
                f"{row['ratio_plain']:.3f}",
                mib(row["wire_per_rank_refresh"]),
                mib(row["wire_per_rank_avg"]),
                f"{row['ratio_avg']:.3f}",
            ]
        )
    return format_table(COMPUTED_HEADERS, body)


def _measured_line(row: dict[str, Any]) -> list[Any]:
    if row["error"] is not None:
        return [row["model"], row["world"], row["method"], row["error"][:60]]
    p = row["plain"]["payload"]
    return [
        row["model"],
        row["world"],
        row["method"],
        mib(p["all_reduce"]),
        mib(p["reduce"] + p["all_to_all"]),
        mib(p["broadcast"]),
        mib(p["all_gather"] + p["reduce_scatter"]),
        mib(row["lo_plain"]),
        _ratio(row["lo_plain_x_ddp"]),
        _ratio(row["lo_over_expected"]),
        mib(row["lo_refresh"]) if row["refresh_measured"] else "-",
        mib(row["lo_avg"]),
        _ratio(row["lo_avg_x_ddp"]),
        _ratio(row["ring_job_avg_x_ddp"]),
    ]


def measured_table(rows: list[dict[str, Any]]) -> str:
    """One line per launch (a failed one: its error): the plain step's counted payload, its
    loopback bytes, the refresh step's and the average at T, with the ratios to ``ddp-adamw``."""
    body = [_measured_line(row) for row in rows]
    body = [r + [""] * (len(MEASURED_HEADERS) - len(r)) for r in body]
    return format_table(MEASURED_HEADERS, body)


def measured_legend(batch: int, seq: int, dtype: str, warmup: int, steps: int, run_gap: int) -> str:
    """What the measured table's columns are, for a run with these settings."""
    return (
        f"\nMeasured: {batch} x {seq} tokens per rank, {dtype}, forked gloo ranks on "
        f"loopback; {warmup} warm-up steps, then {steps} measured one by one, "
        f"projected groups refreshing every {run_gap} steps in the run. Payload MiB: per "
        "rank, a plain step, by collective (counted). lo MiB/step: loopback bytes of the whole "
        "job in a plain step (smallest of the plain steps), barriers subtracted. lo/expected: "
        "over the counted payload times gloo's calibrated bytes per payload byte. avg@T: one "
        "refresh step in T (the recipe's gap: nano 50, 60m 200)."
    )


def factor_lines(factors: dict[int, dict[str, float]]) -> list[str]:
    """gloo's calibrated loopback bytes per payload byte, one line per world size."""
    lines = ["gloo's loopback bytes per payload byte (whole job, 16 MiB tensors):"]
    for world, factor in factors.items():
        listed = ", ".join(f"{op} {value:.3f}" for op, value in factor.items())
        lines.append(
            f"  N={world}: {listed} (ring model: all-reduce {2 * (world - 1)}, others {world - 1})"
        )
    return lines


def prediction_table(predicted: list[dict[str, Any]]) -> str:
    """The computed rows priced with gloo's factors, against ``ddp-adamw``'s measured bytes."""
    return format_table(
        ["model", "N", "gloo lo MiB", "x ddp", "gloo lo avg@T MiB", "x ddp", "ring x ddp"],
        [
            [
                p["model"],
                p["world"],
                mib(p["gloo_lo_plain"]),
                f"{p['gloo_x_ddp_plain']:.3f}",
                mib(p["gloo_lo_avg"]),
                f"{p['gloo_x_ddp_avg']:.3f}",
                f"{p['ring_x_ddp_avg']:.3f}",
            ]
            for p in predicted
        ],
    )
