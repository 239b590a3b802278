"""Optimizer state of flattened (ZeRO) runs, carried from N ranks to M.

Each rank's state is keyed by parameter name (``zero/<name>``): a projected matrix's moments sit
whole on its owner, its basis on every rank holding a run of it; a dense parameter's moments are
cut like its runs (``run`` = start, numel). :func:`export_flattened_state` writes one rank's part
in a world-size-free form (8-bit dense runs are dequantised, since block boundaries move with the
runs); :func:`merge_flattened_states` joins every saved rank's part; :func:`adopt_loaded_state`
then hands each rank, at its first step, exactly what its new runs and ownership need.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from gnlorp_dist.optim.projector import FACTORED_KEYS
from gnlorp_dist.optim.quantized import MOMENT_KEYS, MomentStore
from gnlorp_dist.optim.reshard import cut_run, join_runs

if TYPE_CHECKING:
    from gnlorp_dist.optim.group_step import GroupStep

STATE_PREFIX = "zero/"
LAYOUT_KEY = STATE_PREFIX + "__layout__"
"""Flattened parameters' state is keyed ``zero/<name>`` (names, not tensors: the engine owns the
tensors; ``torch.Optimizer.state_dict`` keeps string keys as they are); this entry records the
engine and world size that saved it."""


def export_flattened_state(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """This rank's flattened state by parameter name, ready for :func:`merge_flattened_states`.

    ``optimizer`` is a :class:`~gnlorp_dist.optim.adamw.GradNormLoRPAdamW`; only its ``state`` is
    read, so it is typed as any optimizer: adamw imports this module, not the other way round.
    """
    exported: dict[str, dict[str, Any]] = {}
    for key, state in optimizer.state.items():
        if not (isinstance(key, str) and key.startswith(STATE_PREFIX)) or key.endswith("__"):
            continue
        entry = {k: v for k, v in state.items() if k not in MOMENT_KEYS and "absmax" not in k}
        if "exp_avg" in state:
            if "run" in state:  # dense run: float moments, re-cut and re-quantised on load
                # Dequantises 8-bit codes (on the parameter's grid, from the run's start).
                exp_avg, exp_avg_sq = MomentStore(state, 32, offset=state["run"][0]).load()
                entry["exp_avg"], entry["exp_avg_sq"] = exp_avg.clone(), exp_avg_sq.clone()
            else:  # a projected matrix's moments move whole, 8-bit codes included
                entry.update({k: v for k, v in state.items() if k in MOMENT_KEYS or "absmax" in k})
        exported[key.removeprefix(STATE_PREFIX)] = entry
    return exported


def merge_flattened_states(shards: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every saved rank's export joined: one entry per name, dense runs stitched together."""
    merged: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    for shard in shards:
        for name, entry in shard.items():
            target = merged.setdefault(name, {"step": entry.get("step", 0)})
            assert target["step"] == entry.get("step", 0), (name, target["step"], entry)
            if "run" in entry:
                start, numel = entry["run"]
                moments = {key: entry[key].reshape(-1)[:numel] for key in MOMENT_KEYS}
                runs.setdefault(name, []).append((start, numel, {"step": entry["step"], **moments}))
                continue
            for key, value in entry.items():
                if key != "step":
                    target.setdefault(key, value)
    for name, pieces in runs.items():
        joined = join_runs(pieces, 32, torch.float32)  # float runs (the export dequantised them)
        merged[name]["dense_exp_avg"] = joined["exp_avg"]
        merged[name]["dense_exp_avg_sq"] = joined["exp_avg_sq"]
    return merged


def adopt_loaded_state(step: GroupStep, pending: dict[str, dict[str, Any]]) -> None:
    """Move loaded state for ``step``'s parameters into this rank's runs and ownership (the
    first step after :meth:`GradNormLoRPAdamW.load_engine_state`; adopted entries leave
    ``pending``).

    Loaded tensors (read onto the CPU) move to where they are used: a projected matrix's basis
    and moments to the group's work device, a dense run's moments to its master's.
    """
    rank = step.comm.rank
    for index, (param, fragment) in enumerate(zip(step.params, step.fragments)):
        entry = pending.pop(param.name, None)
        if entry is None or step.states[index] is None:
            continue
        state = step.state(index)
        state.clear()
        state["step"] = entry["step"]
        if step.projected:
            if "proj" in entry and fragment is not None:
                for key in ("proj", "proj_scale"):
                    if key in entry:
                        state[key] = entry[key].to(step.device)
            if "next_refresh" in entry:
                state["next_refresh"] = entry["next_refresh"]
            if step.owner(index) == rank and "exp_avg" in entry:
                for key, value in entry.items():
                    # ProjFactor's row/column sums live with the moments, on the owner.
                    if key in MOMENT_KEYS or "absmax" in key or key in FACTORED_KEYS:
                        state[key] = value.to(step.device)
        elif fragment is not None and "dense_exp_avg" in entry:
            device = fragment.master.device
            whole = {
                "step": entry["step"],
                "exp_avg": entry["dense_exp_avg"].to(device),
                "exp_avg_sq": entry["dense_exp_avg_sq"].to(device),
            }
            state.update(
                cut_run(
                    whole,
                    fragment.start,
                    fragment.numel,
                    step.spec.moments.bits,
                    torch.float32,
                    param_numel=math.prod(param.shape),
                )
            )
            state["run"] = [fragment.start, fragment.numel]
