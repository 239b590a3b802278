"""From every rank's records to the measured rows: plain and refresh steps apart, loopback bytes
net of the barriers, averages at the recipe's refresh gap, ratios to ``ddp-adamw`` of the same
model and world, the counters' cross-checks, and what gloo would send for the computed rows."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from gnlorp_dist.bench.communication.measure import RunSettings
from gnlorp_dist.bench.communication.payloads import (
    ring_wire_bytes,
    window_average,
    with_touched_rows,
)
from gnlorp_dist.bench.communication.schemes import DDP_ADAMW, ZERO2_ADAMW, model_config, recipe


def _step_summary(
    settings: RunSettings, per_rank: list[dict[str, Any]], i: int, barrier: int
) -> dict[str, Any]:
    """Measured step ``i``: rank 0's record, the refreshes of every rank."""
    record = per_rank[0]["records"][i]
    refreshes = sum(r["records"][i]["refreshes"] for r in per_rank)
    dist_payloads = [r["records"][i]["dist"] for r in per_rank]
    hook = record["hook"]["all_reduce"]
    comm_total = sum(record["comm"].values())
    dist_total = sum(record["dist"].values())
    return {
        "step": record["step"],
        "refresh": refreshes > 0,
        "svds": refreshes,
        "lo_bytes_net": record["lo_bytes"] - barrier,
        "payload": record["dist"],
        "touched_rows": record.get("touched_rows"),
        "payload_ranks_differ": any(p != dist_payloads[0] for p in dist_payloads),
        "ddp_hook_bytes": hook,
        "ddp_buckets": record["hook"]["buckets"],
        "communicator": record["comm"],
        # Every byte handed to torch.distributed came through our communicator or
        # DDP's hook (for the DDP methods and ours); False flags a path neither sees.
        "counters_agree": dist_total == comm_total + hook
        if settings.method != ZERO2_ADAMW
        else None,
        "loss_rank0": record["loss"],
    }


def _smallest_lo(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    # The smallest loopback figure: other traffic in the namespace can only add bytes.
    return min(group, key=lambda s: s["lo_bytes_net"]) if group else None


def summarise_run(settings: RunSettings, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every rank's records: plain and refresh steps apart, lo bytes net of the
    barriers, payload by kind (rank 0's; the ranks' agree or ``payload_ranks_differ`` says),
    and the counter cross-checks."""
    barrier = min(per_rank[0]["empty_windows_lo"])
    steps = [
        _step_summary(settings, per_rank, i, barrier) for i in range(len(per_rank[0]["records"]))
    ]
    return {
        "model": settings.model,
        "method": settings.method,
        "world": settings.world,
        "settings": asdict(settings),
        "barrier_window_lo_bytes": per_rank[0]["empty_windows_lo"],
        "zero_flags": per_rank[0].get("zero_flags"),
        "steps": steps,
        "plain": _smallest_lo([s for s in steps if not s["refresh"]]),
        "refresh": _smallest_lo([s for s in steps if s["refresh"]]),
        "error": None,
    }


def failed_run(settings: RunSettings, err: RuntimeError, detail: str) -> dict[str, Any]:
    """The row of a launch that failed with ``err`` (``detail``: its traceback)."""
    return {
        "model": settings.model,
        "method": settings.method,
        "world": settings.world,
        "settings": asdict(settings),
        "error": f"failed: {err}",
        "error_detail": detail,
    }


def _on_loopback(row: dict[str, Any], factor: dict[str, float]) -> None:
    """``row``'s loopback figures at the recipe's gap and against its calibrated expectation."""
    _, gap = recipe(row["model"])
    world = row["world"]
    plain = row["plain"]
    refresh = row["refresh"] or plain  # methods without refreshes: every step is plain
    row["gap"] = gap
    row["refresh_measured"] = row["refresh"] is not None
    row["lo_plain"] = plain["lo_bytes_net"]
    row["lo_refresh"] = refresh["lo_bytes_net"]
    row["lo_avg"] = (refresh["lo_bytes_net"] + (gap - 1) * plain["lo_bytes_net"]) / gap
    avg_payload = window_average(plain["payload"], refresh["payload"], gap)
    row["payload_avg"] = avg_payload
    row["ring_job_plain"] = world * ring_wire_bytes(plain["payload"], world)
    row["ring_job_avg"] = world * ring_wire_bytes(avg_payload, world)  # type: ignore[arg-type]
    expected = sum(factor.get(op, float("nan")) * n for op, n in plain["payload"].items() if n)
    row["lo_expected_plain"] = expected
    row["lo_over_expected"] = plain["lo_bytes_net"] / expected if expected else None


def _ddp_row(rows: list[dict[str, Any]], model: str, world: int) -> dict[str, Any] | None:
    """The successful ``ddp-adamw`` row of ``model`` at ``world`` ranks, if any."""
    return next(
        (
            r
            for r in rows
            if r["method"] == DDP_ADAMW
            and r["model"] == model
            and r["world"] == world
            and r["error"] is None
        ),
        None,
    )


def add_measured_ratios(rows: list[dict[str, Any]], factors: dict[int, dict[str, float]]) -> None:
    """Per row: the lo bytes expected from its counted payload with gloo's calibrated factors,
    the averages at the recipe's gap, and ratios against ddp-adamw of the same model and world."""
    for row in rows:
        if row["error"] is None:
            _on_loopback(row, factors.get(row["world"], {}))
    for row in rows:
        if row["error"] is not None:
            continue
        base = _ddp_row(rows, row["model"], row["world"])
        for key in ("lo_plain", "lo_avg", "ring_job_plain", "ring_job_avg"):
            row[f"{key}_x_ddp"] = row[key] / base[key] if base else None


def gloo_predictions(
    computed: list[dict[str, Any]],
    measured: list[dict[str, Any]],
    factors: dict[int, dict[str, float]],
) -> list[dict[str, Any]]:
    """The loopback bytes gloo would send for each computed method's payload (its calibrated
    bytes per payload byte), next to DDP + AdamW's measured figure: what the measured table
    will show for a method not measured yet, on this transport."""
    out = []
    for row in computed:
        world, factor = row["world"], factors.get(row["world"])
        base = _ddp_row(measured, row["model"], world)
        if factor is None or base is None:
            continue

        def on_gloo(payload: dict[str, float], factor: dict[str, float] = factor) -> float:
            return sum(factor.get(op, float("nan")) * n for op, n in payload.items() if n)

        plain, avg = on_gloo(row["payload_plain"]), on_gloo(row["payload_avg"])
        out.append(
            {
                "model": row["model"],
                "world": world,
                "method": row["method"],
                "gloo_lo_plain": plain,
                "gloo_lo_avg": avg,
                "ddp_adamw_lo_measured": base["lo_plain"],
                "gloo_x_ddp_plain": plain / base["lo_plain"],
                "gloo_x_ddp_avg": avg / base["lo_avg"],
                "ring_x_ddp_avg": row["ratio_avg"],
            }
        )
    return out


def counters_disagree(rows: list[dict[str, Any]]) -> list[str]:
    """The launches where some step's ``torch.distributed`` total is not communicator + hook."""
    return [
        f"{r['model']} N={r['world']} {r['method']}"
        for r in rows
        if r["error"] is None and any(s["counters_agree"] is False for s in r["steps"])
    ]


def mark_payload_matches(rows: list[dict[str, Any]], computed: list[dict[str, Any]]) -> list[str]:
    """The counted payloads against the shape arithmetic, step by step: sets each measured row's
    ``payload_equals_computed``; returns the launches where they differ. Where they agree to the
    byte, the computed 1B/7B rows describe what the code sends."""
    by_key = {(c["model"], c["world"], c["method"]): c for c in computed}
    mismatched = []
    for row in rows:
        reference = by_key.get((row["model"], row["world"], row["method"]))
        if row["error"] is not None or reference is None:
            continue
        vocab = model_config(row["model"]).vocab_size
        row["payload_equals_computed"] = all(
            s["payload"]
            == with_touched_rows(
                reference["payload_refresh" if s["refresh"] else "payload_plain"],
                row["method"],
                reference["dense_bytes"].get("embed_tokens", 0),
                vocab,
                s.get("touched_rows"),
                row["world"],
            )
            for s in row["steps"]
        )
        if not row["payload_equals_computed"]:
            mismatched.append(f"{row['model']} N={row['world']} {row['method']}")
    return mismatched
