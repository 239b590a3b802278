"""What gloo sends on loopback for one collective of S payload bytes: one launch per world size
times each kind on a small and a large tensor, giving the bytes per payload byte the measured
runs' ``lo/expected`` is priced with."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gnlorp_dist.bench.communication.measure import launch_ranks, sync_read
from gnlorp_dist.bench.communication.schemes import OPS
from gnlorp_dist.distributed.counting import run_collective
from gnlorp_dist.distributed.rendezvous import end_forked_rank, join_file_group


def _samples(op: str, numel: int, world: int, repeats: int, rank: int, barrier: int) -> dict:
    """Loopback bytes of ``repeats`` windows of one ``op`` on ``numel`` float32 elements, less
    the barriers'; the error of the first that fails (gloo lacks some collectives)."""
    samples, error = [], None
    for _ in range(repeats):
        before = sync_read(rank)
        try:
            run_collective(op, numel, world)
        except Exception as err:  # gloo lacks some collectives
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        after = sync_read(rank)
        if error:
            break
        samples.append(after - before - barrier)
    # The payload convention: all-gather counts its output (N x the input).
    payload = numel * 4 * (world if op == "all_gather" else 1)
    return {
        "op": op,
        "payload": payload,
        "lo_bytes": samples,
        "factor": min(samples) / payload if samples else None,
        "error": error,
    }


def _calibrate_rank(rank: int, world: int, sizes: list[int], repeats: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_file_group(rank, world, f"{out_dir}/rendezvous")
    result: dict[str, Any] = {}
    empty = []
    for _ in range(3):
        before = sync_read(rank)
        empty.append(sync_read(rank) - before)
    barrier = min(empty)
    for numel in sizes:
        for op in OPS:
            result[f"{op}/{numel}"] = _samples(op, numel, world, repeats, rank, barrier)
    if rank == 0:
        torch.save(result, Path(out_dir) / "calibration.pt")
    end_forked_rank()


def calibrate(world: int, sizes: Sequence[int] = (1 << 16, 1 << 22), repeats: int = 2) -> dict:
    """Loopback bytes (the whole job's) per payload byte of each collective at ``world`` ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        launch_ranks(_calibrate_rank, (world, list(sizes), repeats, tmp), world, 300.0)
        return torch.load(Path(tmp) / "calibration.pt")


def gloo_factors(calibration: dict[str, Any]) -> dict[str, float]:
    """Per kind, the calibrated job-wide loopback bytes per payload byte (the larger size:
    what large tensors see; the small one is kept in the JSON)."""
    factors: dict[str, float] = {}
    best: dict[str, int] = {}
    for entry in calibration.values():
        if entry["factor"] is None:
            continue
        if entry["payload"] >= best.get(entry["op"], -1):
            best[entry["op"]] = entry["payload"]
            factors[entry["op"]] = entry["factor"]
    return factors
