"""Rows, ratios, invariants and tables of the ZeRO benchmark (:mod:`gnlorp_dist.bench.zero`), and
its two modes: the ZeRO byte table over stages and world sizes, and the one-rank comparison."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from gnlorp_dist.bench.harness import format_table
from gnlorp_dist.bench.zero import DEEPSPEED_ADAMW, OPTIMIZERS, Case, RunSettings, launch
from gnlorp_dist.models import recipe_for_config


def summarise(per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from the same case on every rank."""
    first = per_rank[0]
    states = [r["state_bytes"] for r in per_rank]
    masters = [r["master_bytes"] for r in per_rank]
    times = [max(r["step_seconds"]) if r["step_seconds"] else 0.0 for r in per_rank]
    return {
        **{key: first[key] for key in ("optimizer", "stage", "dtype", "world_size")},
        **{key: first[key] for key in ("engine_optimizer", "stepped_optimizer")},
        **{key: first[key] for key in ("model_numel", "projected_matrices")},
        "state_bytes_per_rank": states,
        "state_bytes_max": max(states),
        "state_bytes_min": min(states),
        "proj_bytes_per_rank": [r["proj_bytes"] for r in per_rank],
        "moment_bytes_per_rank": [r["moment_bytes"] for r in per_rank],
        "master_bytes_per_rank": masters,
        "master_bytes_max": max(masters),
        "master_bytes_min": min(masters),
        "flat_state_groups_per_rank": [r["flat_state_groups"] for r in per_rank],
        "svds_per_refresh_per_rank": [r["svds_per_refresh"] for r in per_rank],
        "svds_per_refresh_total": sum(r["svds_per_refresh"] for r in per_rank),
        "step_seconds_max_rank": max(times),
        "losses_rank0": first["losses"],
        "tokens_per_s": first["tokens_per_s"],
        "peak_bytes_per_rank": [r["peak_bytes"] for r in per_rank],
        "allocated_before_bytes_per_rank": [r["allocated_before_bytes"] for r in per_rank],
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per-rank state over the same optimizer and stage at 1 rank, and over DeepSpeed's AdamW at
    the same stage and world size (both measured in this run; None where it was not)."""
    index = {(r["optimizer"], r["stage"], r["world_size"]): r for r in rows}
    for row in rows:
        one = index.get((row["optimizer"], row["stage"], 1))
        ds = index.get((DEEPSPEED_ADAMW, row["stage"], row["world_size"]))
        row["state_max_over_1rank"] = (
            row["state_bytes_max"] / one["state_bytes_max"] if one else None
        )
        row["state_max_over_deepspeed_adamw"] = (
            row["state_bytes_max"] / ds["state_bytes_max"] if ds else None
        )


def _check_shrinking(rows: Sequence[dict[str, Any]], worlds: list[int]) -> None:
    for optimizer in {r["optimizer"] for r in rows}:
        for stage in (1, 2, 3):
            series = [
                r
                for w in worlds
                for r in rows
                if r["world_size"] == w and r["optimizer"] == optimizer and r["stage"] == stage
            ]
            for small, large in zip(series, series[1:]):
                for key in ("state_bytes_max", "master_bytes_max"):
                    assert large[key] < small[key], (optimizer, stage, key, small, large)


def check_invariants(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the numbers must satisfy; raise AssertionError naming the row that breaks it."""
    checks: list[str] = []
    for row in rows:
        if row["optimizer"] == DEEPSPEED_ADAMW and row["stage"] >= 1:
            # exp_avg + exp_avg_sq in fp32 of the master partition's shape: DeepSpeed's AdamW
            # state lives on the flat partitions, not on the model's parameters.
            for moments, master in zip(row["moment_bytes_per_rank"], row["master_bytes_per_rank"]):
                assert moments == 2 * master, row
    checks.append("DeepSpeed AdamW moments = 2 x its fp32 master partition, on every rank")
    worlds = sorted({r["world_size"] for r in rows})
    _check_shrinking(rows, worlds)
    if len(worlds) > 1:
        checks.append(f"stages 1-3: max per-rank state and master bytes shrink over ranks {worlds}")
    for row in rows:
        if row["optimizer"] != DEEPSPEED_ADAMW:
            # Each subspace is computed once in the whole job, whichever rank owns it.
            assert row["svds_per_refresh_total"] == row["projected_matrices"], row
    checks.append("ours: SVDs per refresh summed over ranks = projected matrices")
    return checks


def _b(value: int) -> str:
    return f"{value:,}"


def _ratio(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


ZERO_HEADERS = (
    "stage", "ranks", "optimizer", "state B/rank max", "state B/rank min", "x 1 rank",
    "x ds-adamw", "fp32 master B/rank max", "master min", "SVDs/refresh/rank",
)  # fmt: skip


def zero_table(rows: Sequence[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        svds = r["svds_per_refresh_per_rank"]
        body.append(
            [
                r["stage"],
                r["world_size"],
                r["optimizer"],
                _b(r["state_bytes_max"]),
                _b(r["state_bytes_min"]),
                _ratio(r["state_max_over_1rank"]),
                _ratio(r["state_max_over_deepspeed_adamw"]),
                _b(r["master_bytes_max"]),
                _b(r["master_bytes_min"]),
                "-" if r["optimizer"] == DEEPSPEED_ADAMW else "/".join(f"{s:g}" for s in svds),
            ]
        )
    return format_table(ZERO_HEADERS, body)


COMPARE_HEADERS = (
    "optimizer", "stepped by", "state B", "x ds", "master B", "peak B", "x ds", "tokens/s", "x ds",
)  # fmt: skip


def compare_table(rows: Sequence[dict[str, Any]]) -> str:
    ds = next((r for r in rows if r["optimizer"] == DEEPSPEED_ADAMW), None)
    body = []
    for r in rows:
        peak = r["peak_bytes_per_rank"][0]
        ds_peak = ds["peak_bytes_per_rank"][0] if ds else None
        body.append(
            [
                r["optimizer"],
                r["stepped_optimizer"],
                _b(r["state_bytes_max"]),
                _ratio(r["state_bytes_max"] / ds["state_bytes_max"] if ds else None),
                _b(r["master_bytes_max"]),
                "-" if peak is None else _b(peak),
                _ratio(peak / ds_peak if peak is not None and ds_peak else None),
                f"{r['tokens_per_s']:.0f}",
                _ratio(r["tokens_per_s"] / ds["tokens_per_s"] if ds else None),
            ]
        )
    return format_table(COMPARE_HEADERS, body)


def parameter_counts(rows: Sequence[dict[str, Any]]) -> str:
    """Parameter counts of the models trained: plain (DeepSpeed's AdamW) and weight-normalised
    (ours: one magnitude more per output row of each projected layer)."""
    counts = sorted({r["model_numel"] for r in rows})
    label = "params (plain / weight-normalised)" if len(counts) == 2 else "params"
    return " / ".join(f"{c:,}" for c in counts) + " " + label


# -- the two modes -----------------------------------------------------------------------------


def zero_mode(
    model: str, optimizers: Sequence[str], stages: Sequence[int], worlds: Sequence[int],
    settings: RunSettings,
) -> dict[str, Any]:  # fmt: skip
    """Every optimizer at every stage on every world size (forked ranks): the byte table."""
    cases = [Case(o, s) for s in stages for o in optimizers]
    rows: list[dict[str, Any]] = []
    for world_size in worlds:
        started = time.perf_counter()
        results = launch(cases, settings, world_size)
        print(f"{world_size} rank(s): {time.perf_counter() - started:.0f} s", flush=True)
        rows += [summarise([results[r][i] for r in range(world_size)]) for i in range(len(cases))]
    rows.sort(key=lambda r: (r["stage"], r["world_size"], OPTIMIZERS.index(r["optimizer"])))
    add_ratios(rows)
    checks = check_invariants(rows)
    spec = recipe_for_config(settings.config)
    print(
        f"\n{model} ({parameter_counts(rows)}, fp32), ZeRO stages "
        f"{list(stages)} over {list(worlds)} gloo ranks, {settings.steps} steps of "
        f"{settings.batch} x {settings.seq} tokens per rank; rank {spec.rank}, T="
        f"{spec.update_proj_gap}. Exact bytes per rank after the last step:"
    )
    print(zero_table(rows))
    print("\nchecked: " + "; ".join(checks))
    return {"mode": "zero", "rows": rows, "checks": checks}


def compare_mode(
    model: str, optimizers: Sequence[str], stage: int, dtype: str, settings: RunSettings
) -> dict[str, Any]:
    """Every optimizer at one stage on one rank in this process: peak memory and speed."""
    cases = [Case(o, stage, dtype) for o in optimizers]
    results = launch(cases, settings, 1, in_process=True)
    rows = [summarise([r]) for r in results[0]]
    add_ratios(rows)
    checks = check_invariants(rows)
    print(
        f"\n{model} ({parameter_counts(rows)}), ZeRO-{stage} {dtype} on "
        f"one {settings.device.upper()} rank, {settings.steps} timed steps after {settings.warmup}"
        f" warm-up, {settings.batch} x {settings.seq} tokens. peak B = max_memory_allocated above "
        "the allocation before the run (CUDA only):"
    )
    print(compare_table(rows))
    print("\nchecked: " + "; ".join(checks))
    return {"mode": "single-rank-compare", "rows": rows, "checks": checks}
