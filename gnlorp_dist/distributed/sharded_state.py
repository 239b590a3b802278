"""Sharded optimizer checkpoints: save on N ranks, load on M (resharding).

The scalable path for very large optimizer states: no rank ever holds more than its own shard,
whereas ``optimizer.state_dict()`` (what ``transformers.Trainer`` and ``accelerate`` save)
gathers the whole state on every rank (:mod:`gnlorp_dist.optim.state_dict`).

Each rank writes one file, ``optimizer-shard-<r>-of-<N>.pt``, with the state of the blocks it
owns (:mod:`gnlorp_dist.optim.ownership`), each tagged with its parameter index, shape and rows.
Loading reads every shard, re-plans ownership for the current world size and gives each rank the
state of its new blocks: a projected matrix's state moves whole to its new owner; a dense
tensor's row blocks are concatenated and cut again. Same world size: the states load unchanged
(bitwise, 8-bit codes included). Another world size: fp32 states are exact; 8-bit dense blocks
are dequantised, re-cut and quantised again (block scales follow the new rows).

Files load with ``torch.load(weights_only=True)``, onto the CPU (the saving rank's GPU may not
exist here); each tensor then moves to its parameter's device when its rank adopts it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from gnlorp_dist.optim.adamw import GradNormLoRPAdamW
from gnlorp_dist.optim.reshard import join_states, rows_of_state, saved_state

FORMAT_VERSION = 1
_SHARD = re.compile(r"optimizer-shard-(\d+)-of-(\d+)\.pt$")


def shard_path(directory: str | os.PathLike, rank: int, world_size: int) -> Path:
    return Path(directory) / f"optimizer-shard-{rank:05d}-of-{world_size:05d}.pt"


def save_sharded_optimizer(optimizer: GradNormLoRPAdamW, directory: str | os.PathLike) -> Path:
    """Write this rank's shard into ``directory`` (atomically: temporary file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank, world_size = optimizer.comm.rank, optimizer.comm.world_size
    entries: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(_flat_params(optimizer)):
        state = optimizer.state.get(param)
        if not state or not optimizer.owns(param):
            continue  # nothing, or a replica whose owner saves the whole state
        block = optimizer.owned_block(param)
        entries[index] = {
            "shape": list(param.shape),
            "row_start": block.row_start,
            "row_stop": block.row_stop,
            "whole": block.whole,
            "state": saved_state(state),
        }
    payload = {
        "format": FORMAT_VERSION,
        "rank": rank,
        "world_size": world_size,
        "num_params": len(_flat_params(optimizer)),
        "param_groups": [
            {k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups
        ],
        "entries": entries,
    }
    final = shard_path(directory, rank, world_size)
    temporary = final.with_suffix(f".tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    return final


def load_sharded_optimizer(optimizer: GradNormLoRPAdamW, directory: str | os.PathLike) -> None:
    """Load the shards in ``directory`` into ``optimizer``, resharding for its world size."""
    payloads = _read_shards(Path(directory))
    params = _flat_params(optimizer)
    saved_count = payloads[0]["num_params"]
    if saved_count != len(params):
        raise ValueError(
            f"optimizer checkpoint in {directory} has {saved_count} parameters, this optimizer "
            f"has {len(params)}: it was saved for another model or other parameter groups"
        )
    for group, saved_group in zip(optimizer.param_groups, payloads[0]["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "param_names"})
    optimizer.drop_consolidated_state()  # a consolidation made before this load is stale
    optimizer.state.clear()
    for index, param in enumerate(params):
        pieces = [p["entries"][index] for p in payloads if index in p["entries"]]
        if not pieces:
            continue
        for piece in pieces:
            if piece["shape"] != list(param.shape):
                raise ValueError(
                    f"parameter {index}: checkpoint shape {piece['shape']} != {list(param.shape)}"
                )
        if not optimizer.owns(param):
            replica = optimizer.replica_state(param, pieces[0]["state"])
            if replica is not None:
                optimizer.state[param] = {
                    k: v.to(param.device) if torch.is_tensor(v) else v for k, v in replica.items()
                }
            continue
        group, _name = optimizer.group_and_name(param)
        block = optimizer.owned_block(param)
        optimizer.state[param] = _state_for_block(pieces, block, param, group["bits"])


def _state_for_block(pieces: list[dict[str, Any]], block: Any, param: torch.Tensor, bits: int):
    for piece in pieces:
        if (piece["row_start"], piece["row_stop"]) == (block.row_start, block.row_stop):
            # The same block as saved: its state unchanged (bitwise, 8-bit codes included).
            return {
                k: v.to(param.device) if torch.is_tensor(v) else v
                for k, v in piece["state"].items()
            }
    # A dense tensor saved whole (one rank, or too small to split there) and now cut in row
    # blocks, or saved in row blocks and now owned whole or cut otherwise: join, then cut. A
    # projected matrix is always owned whole, so its block always matches above.
    whole = join_states(
        [(piece["row_start"], piece["row_stop"], piece["state"]) for piece in pieces],
        bits,
        param.dtype,
    )
    block_state = rows_of_state(whole, block.row_start, block.row_stop, bits, param.dtype)
    return {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in block_state.items()}


def _read_shards(directory: Path) -> list[dict[str, Any]]:
    found: dict[int, int] = {}
    for path in directory.glob("optimizer-shard-*-of-*.pt"):
        match = _SHARD.search(path.name)
        if match:
            found[int(match.group(1))] = int(match.group(2))
    if not found:
        raise ValueError(f"no optimizer shards (optimizer-shard-*-of-*.pt) in {directory}")
    world_sizes = set(found.values())
    if len(world_sizes) != 1:
        raise ValueError(
            f"{directory} mixes shards of world sizes {sorted(world_sizes)}; keep one save only"
        )
    saved_world = world_sizes.pop()
    missing = sorted(set(range(saved_world)) - set(found))
    if missing:
        raise ValueError(
            f"{directory} holds shards {sorted(found)} of a {saved_world}-rank save: ranks "
            f"{missing} are missing, so their optimizer state is lost and the run cannot be "
            "resharded. Copy the missing files or resume from an older complete checkpoint."
        )
    payloads = []
    for rank in range(saved_world):
        path = shard_path(directory, rank, saved_world)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign file: name it
            raise ValueError(
                f"optimizer shard {path} cannot be read ({type(err).__name__}: {err}); it is "
                "truncated or not a gnlorp_dist shard: resume from an older complete checkpoint"
            ) from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"optimizer shard {path} has format {found!r}, not {FORMAT_VERSION}")
        payloads.append(payload)
    return payloads


def _flat_params(optimizer: GradNormLoRPAdamW) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]
