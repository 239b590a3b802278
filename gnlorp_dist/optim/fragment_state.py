"""Optimizer state of flattened (ZeRO) runs, carried from N ranks to M.

Each rank's state is keyed by parameter name (``zero/<name>``): a projected matrix's moments sit
whole on its owner, its basis on every rank holding a run of it; a dense parameter's moments are
cut like its runs (``run`` = start, numel). :func:`export_flattened_state` writes one rank's part
in a world-size-free form (8-bit dense runs are dequantised, since block boundaries move with the
runs); :func:`merge_flattened_states` joins every saved rank's part; :func:`adopt_pending_state`
then hands each rank, at its first step, exactly what its new runs and ownership need.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gnlorp_dist.optim.fragments import Fragment, ModelParameter
from gnlorp_dist.optim.quantized import MOMENT_KEYS, MomentStore

if TYPE_CHECKING:
    from gnlorp_dist.optim.adamw import GradNormLoRPAdamW

STATE_PREFIX = "zero/"


def export_flattened_state(optimizer: GradNormLoRPAdamW) -> dict[str, dict[str, Any]]:
    """This rank's flattened state by parameter name, ready for :func:`merge_flattened_states`."""
    exported: dict[str, dict[str, Any]] = {}
    for key, state in optimizer.state.items():
        if not (isinstance(key, str) and key.startswith(STATE_PREFIX)) or key.endswith("__"):
            continue
        entry = {k: v for k, v in state.items() if k not in MOMENT_KEYS and "absmax" not in k}
        if "exp_avg" in state:
            if "run" in state:  # dense run: float moments, re-cut and re-quantised on load
                exp_avg, exp_avg_sq = MomentStore(state, 32).load()  # dequantises 8-bit codes
                entry["exp_avg"], entry["exp_avg_sq"] = exp_avg.clone(), exp_avg_sq.clone()
            else:  # a projected matrix's moments move whole, 8-bit codes included
                entry.update({k: v for k, v in state.items() if k in MOMENT_KEYS or "absmax" in k})
        exported[key.removeprefix(STATE_PREFIX)] = entry
    return exported


def merge_flattened_states(shards: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every saved rank's export joined: one entry per name, dense runs stitched together."""
    merged: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[tuple[int, int, Tensor, Tensor]]] = {}
    for shard in shards:
        for name, entry in shard.items():
            target = merged.setdefault(name, {"step": entry.get("step", 0)})
            assert target["step"] == entry.get("step", 0), (name, target["step"], entry)
            if "run" in entry:
                start, numel = entry["run"]
                runs.setdefault(name, []).append(
                    (start, numel, entry["exp_avg"], entry["exp_avg_sq"])
                )
                continue
            for key, value in entry.items():
                if key != "step":
                    target.setdefault(key, value)
    for name, pieces in runs.items():
        pieces.sort(key=lambda piece: piece[0])
        position = 0
        for start, numel, _m, _v in pieces:
            assert start == position, f"{name}: saved runs leave a gap at element {position}"
            position += numel
        merged[name]["dense_exp_avg"] = torch.cat([p[2].reshape(-1)[: p[1]] for p in pieces])
        merged[name]["dense_exp_avg_sq"] = torch.cat([p[3].reshape(-1)[: p[1]] for p in pieces])
    return merged


def adopt_pending_state(
    optimizer: GradNormLoRPAdamW,
    group: dict[str, Any],
    params: list[ModelParameter],
    fragments: list[Fragment | None],
    owners: list[int] | None,
    device: torch.device | None,
) -> None:
    """Move loaded state for ``params`` into this rank's runs and ownership (first step only).

    Loaded tensors (read onto the CPU) move to where they are used: a projected matrix's basis
    and moments to ``device`` (the group's work device), a dense run's moments to its master's.
    """
    pending = getattr(optimizer, "pending_flattened_state", None)
    if not pending:
        return
    rank = optimizer.comm.rank
    for index, (param, fragment) in enumerate(zip(params, fragments)):
        entry = pending.pop(param.name, None)
        if entry is None:
            continue
        state = optimizer.state[STATE_PREFIX + param.name]
        state.clear()
        state["step"] = entry["step"]
        if owners is not None:  # projected
            assert device is not None, "a projected group adopts its state on its work device"
            if "proj" in entry and fragment is not None:
                state["proj"] = entry["proj"].to(device)
            if owners[index] == rank and "exp_avg" in entry:
                for key, value in entry.items():
                    if key in MOMENT_KEYS or "absmax" in key:
                        state[key] = value.to(device)
        elif fragment is not None and "dense_exp_avg" in entry:
            stop = fragment.start + fragment.numel
            device = fragment.master.device
            exp_avg = entry["dense_exp_avg"][fragment.start : stop].to(device)
            exp_avg_sq = entry["dense_exp_avg_sq"][fragment.start : stop].to(device)
            moments = MomentStore(state, group["bits"], param_numel=math.prod(param.shape))
            moments.initialise(exp_avg)
            loaded_m, loaded_v = moments.load()
            loaded_m.copy_(exp_avg)
            loaded_v.copy_(exp_avg_sq)
            moments.store(loaded_m, loaded_v)
            state["run"] = [fragment.start, fragment.numel]
