"""Rows, ratios and the printed report of the engine comparison
(:mod:`gnlorp_dist.bench.engines`): pure functions of the ranks' results, no launches."""

from __future__ import annotations

import statistics
from typing import Any

from gnlorp_dist.bench.engines import EngineSettings
from gnlorp_dist.bench.harness import format_table
from gnlorp_dist.models import ModelSpec


def pool_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per rank from several launches of one engine: the first launch's counts and
    losses (the same in every launch: same seed, same data), every launch's timed steps."""
    pooled = [dict(rank) for rank in rounds[0]]
    for rank, result in enumerate(pooled):
        result["step_s"] = [t for launch in rounds for t in launch[rank]["step_s"]]
        # Each launch's median step (slowest rank per step): the ratios to DDP pair launches
        # of the same round, which ran close together in time.
        result["launch_medians_s"] = [
            statistics.median(max(times) for times in zip(*(r["step_s"] for r in launch)))
            for launch in rounds
        ]
    return pooled


def summarise_engine(engine: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every rank's result: per-rank lists, max/mean, the median step time."""
    states = [r["state_bytes"] for r in per_rank]
    # The slowest rank is the step's time (the next collective waits for it).
    per_step = [max(times) for times in zip(*(r["step_s"] for r in per_rank))]
    return {
        "engine": engine,
        "how": per_rank[0]["how"],
        "state_bytes_per_rank": states,
        "state_bytes_max": max(states),
        "state_bytes_mean": statistics.fmean(states),
        "proj_bytes_per_rank": [r["proj_bytes"] for r in per_rank],
        "weight_bytes_per_rank": [r["weight_bytes"] for r in per_rank],
        "weight_bytes_full": per_rank[0]["weight_bytes_full"],
        "master_bytes_per_rank": [r["master_bytes"] for r in per_rank],
        "refreshes_per_rank": [r["refreshes"] for r in per_rank],
        "projected_matrices": per_rank[0]["projected_matrices"],
        "losses_rank0": per_rank[0]["losses"],
        "losses_per_rank": [r["losses"] for r in per_rank],
        "step_s_per_rank": [r["step_s"] for r in per_rank],
        "step_s_slowest_rank": per_step,
        "step_s_median": statistics.median(per_step),
        "launch_step_s_medians": per_rank[0].get("launch_medians_s", [statistics.median(per_step)]),
        "error": None,
    }


def engine_rows(
    engines: tuple[str, ...],
    runs: dict[str, list[list[dict[str, Any]]]],
    errors: dict[str, tuple[str, str]],
) -> list[dict[str, Any]]:
    """One row per engine, in ``engines`` order: its pooled launches, or its error."""
    rows: list[dict[str, Any]] = []
    for engine in engines:
        if engine in errors:
            error, detail = errors[engine]
            rows.append({"engine": engine, "error": error, "error_detail": detail})
        else:
            rows.append(summarise_engine(engine, pool_rounds(runs[engine])))
    return rows


def add_engine_ratios(rows: list[dict[str, Any]], one_process_bytes: int, world: int) -> None:
    """Ratios against ``ddp`` of this run (None where ddp failed or was not asked for), and
    the max per-rank state against one process's total / N."""
    reference = one_process_bytes / world
    ddp = next((r for r in rows if r["engine"] == "ddp" and r["error"] is None), None)
    for row in rows:
        row["one_process_state_bytes"] = one_process_bytes
        row["one_process_state_bytes_over_n"] = reference
        if row["error"] is not None:
            continue
        row["state_max_over_one_process_n"] = row["state_bytes_max"] / reference
        row["state_max_over_ddp"] = row["state_bytes_max"] / ddp["state_bytes_max"] if ddp else None
        row["step_median_over_ddp"] = None
        if ddp:
            # Median over rounds of (this launch's median / DDP's in the same round): a shared
            # machine's load moves between rounds far more than within one.
            pairs = zip(row["launch_step_s_medians"], ddp["launch_step_s_medians"])
            row["step_median_over_ddp"] = statistics.median(a / b for a, b in pairs)


def add_loss_gaps(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Rank 0's max |loss difference| from ddp's over all steps, per other engine that ran
    (recorded in each row as ``loss_max_abs_diff_vs_ddp``); empty without a ddp row."""
    ok = [r for r in rows if r["error"] is None]
    ddp = next((r for r in ok if r["engine"] == "ddp"), None)
    if ddp is None:
        return {}
    # Same weights, same data, same optimizer: every engine should follow DDP's losses.
    gaps = {
        r["engine"]: max(abs(a - b) for a, b in zip(r["losses_rank0"], ddp["losses_rank0"]))
        for r in ok
        if r is not ddp
    }
    for row in ok:
        row["loss_max_abs_diff_vs_ddp"] = gaps.get(row["engine"], 0.0)
    return gaps


def first_step_losses(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Rank 0's first loss per engine that ran."""
    return {r["engine"]: r["losses_rank0"][0] for r in rows if r["error"] is None}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


ENGINE_HEADERS = (
    "engine", "state B/rank max", "mean", "1-proc/N", "max x 1-proc/N", "x ddp",
    "proj B/rank max", "weights B/rank", "master B/rank", "step ms", "x ddp", "SVDs/rank",
    "last loss",
)  # fmt: skip


def _engine_cells(r: dict[str, Any]) -> list[str]:
    if r["error"] is not None:
        return [r["engine"], "failed (below)"] + ["-"] * (len(ENGINE_HEADERS) - 2)
    return [
        r["engine"],
        f"{r['state_bytes_max']:,}",
        f"{r['state_bytes_mean']:,.0f}",
        f"{r['one_process_state_bytes_over_n']:,.0f}",
        f"{r['state_max_over_one_process_n']:.3f}",
        _fmt(r["state_max_over_ddp"], ".3f"),
        f"{max(r['proj_bytes_per_rank']):,}",
        f"{max(r['weight_bytes_per_rank']):,}",
        f"{max(r['master_bytes_per_rank']):,}",
        f"{r['step_s_median'] * 1e3:.1f}",
        _fmt(r["step_median_over_ddp"], ".3f"),
        "/".join(str(n) for n in r["refreshes_per_rank"]),
        f"{r['losses_rank0'][-1]:.4f}",
    ]


def engine_table(rows: list[dict[str, Any]]) -> str:
    return format_table(ENGINE_HEADERS, [_engine_cells(r) for r in rows])


def report(
    rows: list[dict[str, Any]],
    settings: EngineSettings,
    spec: ModelSpec,
    rounds: int,
    one_process: int,
    gaps: dict[str, float],
) -> str:
    """What the script prints after the launches: the setting, the table, the notes."""
    world = settings.world_size
    lines = [
        f"\n{settings.model}, fp32, GradNormLoRPAdamW (rank {spec.rank}, T={spec.update_proj_gap}, "
        f"alpha {spec.scale}) on {world} gloo ranks; {settings.batch} x {settings.seq} tokens per "
        f"rank; step ms = median over {settings.steps} steps after {settings.warmup} warm-up "
        f"(step 0 refreshes) x {rounds} launch(es) per engine, order rotating, slowest "
        "rank per step; its x ddp = median over rounds of the ratio of launch medians; bytes "
        "exact, after the last step:",
        engine_table(rows),
        f"1-proc/N: one process's optimizer state ({one_process:,} B) / {world}. proj: the "
        "projection bases (inside state). weights: this rank's parameter bytes (FSDP2: its "
        "shard). master: DeepSpeed's fp32 master partition (not in state).",
    ]
    lines += [
        f"{row['engine']} failed: {row['error']} (traceback in the JSON)"
        for row in rows
        if row["error"] is not None
    ]
    if gaps:
        listed = ", ".join(f"{name} {gap:.2e}" for name, gap in gaps.items())
        lines.append(f"rank 0's loss, max |difference| from ddp's over all steps: {listed}")
    first_losses = first_step_losses(rows)
    if len(set(first_losses.values())) > 1:
        lines.append(f"note: the first-step losses differ across engines: {first_losses}")
    return "\n".join(lines)
