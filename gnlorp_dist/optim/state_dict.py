"""GradNormLoRPAdamW's ``state_dict()`` across ranks: one world-size-independent format.

Savers such as ``transformers.Trainer`` and ``accelerate``'s ``save_state`` write ONE
``optimizer.state_dict()`` (rank 0's) and load it back on every rank. A sharded optimizer's
state dict therefore holds the whole job's state, as one process would have it:

``{"state": {param index: state}, "param_groups": [...], "gnlorp": {"format": 1,
"consolidated": True, "world_size": N}}``: torch's own format (``Optimizer.load_state_dict``
ignores the extra top-level key), projected matrices' states from their owners, dense row
blocks joined in row order (:mod:`gnlorp_dist.optim.reshard`), tensors on the CPU and plain
values only (``torch.load(weights_only=True)`` reads it). Loading it on any number of ranks
keeps this rank's shard: the matrices it owns now, its row blocks cut again.

Under an engine that flattens parameters (DeepSpeed ZeRO) the state dict stays per rank (the
engine saves and loads one per rank) and its marker names the rank (``"consolidated": False``):
it loads only into that rank of that world size.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from gnlorp_dist.optim.comm import Communicator
from gnlorp_dist.optim.fragment_state import LAYOUT_KEY
from gnlorp_dist.optim.fragments import ModelParameter
from gnlorp_dist.optim.layouts import Layout
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.param_table import ParamTable
from gnlorp_dist.optim.projection import low_rank_shape, projection_shape
from gnlorp_dist.optim.quantized_basis import stored_shape
from gnlorp_dist.optim.reshard import join_states, rows_of_state, saved_state
from gnlorp_dist.optim.spec import group_params, moments_of, projection_of
from gnlorp_dist.optim.validation import (
    layout_world_size_error,
    ranks_missing_error,
    shard_state_dict_error,
    unmarked_state_dict_error,
)

FORMAT_KEY = "gnlorp"
FORMAT_VERSION = 1
TIMEOUT_ENV = "GNLORP_STATE_DICT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0


def arrival_timeout_s() -> float:
    """Seconds a rank waits for its peers to join a consolidation (``$GNLORP_STATE_DICT_TIMEOUT_S``,
    default 60)."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        timeout = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds") from None
    if not timeout > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds > 0")
    return timeout


def marker(*, consolidated: bool, rank: int | None, world_size: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "consolidated": consolidated,
        "world_size": world_size,
    }
    if rank is not None:
        entry["rank"] = rank
    return entry


@dataclass(frozen=True, kw_only=True)
class Shards:
    """What the formats need to know of an optimizer: its parameters, who owns which block of
    each, and the ranks."""

    comm: Communicator
    """The ranks the state is sharded over."""
    table: ParamTable
    """The optimizer's groups and parameters."""
    low_rank_reduction: bool
    """Every rank keeps each projected matrix's basis and step (the low-rank reduction)."""

    def params(self) -> list[torch.Tensor]:
        """Every tensor the groups hold now, in torch's state-dict order."""
        return [param for group in self.table.groups for param in group_params(group)]

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank holds (part of) ``param``'s optimizer state."""
        return any(b.owner == self.comm.rank for b in self._blocks(param))

    def owned_block(self, param: torch.Tensor) -> OwnedBlock:
        """The block of ``param`` this rank owns (it must own one)."""
        (block,) = [b for b in self._blocks(param) if b.owner == self.comm.rank]
        return block

    def _blocks(self, param: torch.Tensor) -> list[OwnedBlock]:
        return self.table.ownership(self.comm.world_size)[param]

    def replica_state(
        self, param: torch.Tensor, owner_state: dict[str, Any]
    ) -> dict[str, Any] | None:
        """What a rank that does not own ``param`` keeps of its owner's state: under the
        low-rank reduction every rank projects with the basis and counts the steps of every
        projected matrix (``{"step", "proj"}``); otherwise nothing (None)."""
        group_index, _name = self.table.find(param)
        projection = self.table.specs[group_index].projection
        if not self.low_rank_reduction or self.comm.world_size == 1 or projection is None:
            return None
        if projection.random:  # nothing stored: the step count alone regenerates the basis
            return {"step": owner_state["step"]} if "step" in owner_state else None
        if "proj" not in owner_state:
            return None
        kept = ("step", "proj", "proj_scale", "next_refresh")
        return {key: owner_state[key] for key in kept if key in owner_state}


NamedParameters = list[tuple[ModelParameter, Layout, dict[str, Any]]]
"""Every parameter with its true shape and name, its group's layout and its group."""


def wait_for_every_rank(comm: Any) -> None:
    """Return once every rank has arrived here; a ValueError naming the fix if they do not
    within :func:`arrival_timeout_s` (a rank-0-only save without consolidation)."""
    if comm.world_size > 1:
        timeout = arrival_timeout_s()
        if not comm.all_ranks_arrive("state_dict", timeout):
            raise ranks_missing_error(
                "optimizer.state_dict() / consolidate_state_dict()",
                comm.rank,
                comm.world_size,
                timeout,
            )


def is_flattened(state: MutableMapping[Any, Any], layouts: list[Layout]) -> bool:
    """Whether an engine (DeepSpeed ZeRO) flattened the groups: then the state stays per rank."""
    return LAYOUT_KEY in state or any(lay.flattened for lay in layouts)


def sharded_in_place(layouts: list[Layout]) -> bool:
    """Whether the parameters are sharded where they are (FSDP2), not replaced (ZeRO)."""
    return any(not (lay.replicated or lay.flattened) for lay in layouts)


def with_marker(comm: Communicator, local: dict[str, Any]) -> dict[str, Any]:
    """``local`` (torch's ``state_dict()`` of this rank) marked: the whole state on one process,
    this rank's shard of flattened groups."""
    if comm.world_size == 1:
        return {**local, FORMAT_KEY: marker(consolidated=True, rank=None, world_size=1)}
    return {
        **local,
        FORMAT_KEY: marker(consolidated=False, rank=comm.rank, world_size=comm.world_size),
    }


def _bits(groups: list[dict[str, Any]]) -> list[int]:
    """Each parameter's moment bits, from its group (ours, or a saved one)."""
    return [moments_of(group).bits for group in groups for _param in group_params(group)]


def consolidate(shards: Shards, local: dict[str, Any]) -> dict[str, Any]:
    """The whole job's state dict from this rank's ``local`` (torch's ``state_dict()`` of it).

    A collective: every rank gathers every rank's blocks (all_gather_object of CPU tensors), so
    each holds the full state for a moment.
    """
    params = shards.params()
    pieces = []
    for index, state in local["state"].items():
        if not shards.owns(params[index]):
            continue  # a replica (basis and step counter) whose owner saves the whole state
        block = shards.owned_block(params[index])
        pieces.append((index, block.row_start, block.row_stop, block.whole, saved_state(state)))
    by_index: dict[int, list[tuple[int, int, bool, dict[str, Any]]]] = {}
    for rank_pieces in shards.comm.all_gather_object(pieces):
        for index, start, stop, whole, state in rank_pieces:  # type: ignore[attr-defined]
            by_index.setdefault(index, []).append((start, stop, whole, state))
    bits = _bits(shards.table.groups)
    merged: dict[int, dict[str, Any]] = {}
    for index in sorted(by_index):
        found = by_index[index]
        if len(found) == 1 and found[0][2]:
            merged[index] = found[0][3]  # a whole block: bitwise, 8-bit codes included
            continue
        pieces = [(start, stop, state) for start, stop, _whole, state in found]
        merged[index] = join_states(pieces, bits[index], params[index].dtype)
    return {
        "state": merged,
        "param_groups": local["param_groups"],
        FORMAT_KEY: marker(consolidated=True, rank=None, world_size=shards.comm.world_size),
    }


def sharded_state_dict(
    named: NamedParameters, world_size: int, local: dict[str, Any]
) -> dict[str, Any]:
    """Parameters sharded in place (FSDP2): this rank's ``local`` state with every sharded
    tensor handed out as its layout describes it (a DTensor), the form
    ``torch.distributed.checkpoint`` saves from every rank and reshards on load. ``named``:
    every parameter in param_groups order (torch's indices)."""
    state = {}
    for index, entry in local["state"].items():
        param, layout, group = named[index]
        state[index] = layout.state_for_saving(param, group, entry)
    marked = marker(consolidated=False, rank=None, world_size=world_size)
    marked["sharded"] = True
    return {**local, "state": state, FORMAT_KEY: marked}


def unwrap_sharded_state(named: NamedParameters, state: MutableMapping[Any, Any]) -> None:
    """After a load into parameters sharded in place: each state back in the local form the
    driver works on (the inverse of :func:`sharded_state_dict`)."""
    for param, layout, group in named:
        if param.tensor in state:
            state[param.tensor] = layout.state_from_loading(param, group, state[param.tensor])


def prepare_to_load(
    shards: Shards, state_dict: dict[str, Any], *, sharded: bool = False
) -> dict[str, Any]:
    """What ``torch.optim.Optimizer.load_state_dict`` must load on this rank, or a ValueError
    when ``state_dict`` is one rank's shard that does not belong here, or holds states that do
    not fit this optimizer's parameters (:func:`check_state_fits`).

    ``sharded`` (parameters sharded in place, FSDP2): the state dict is the DTensor form of
    :func:`sharded_state_dict`, possibly without its marker (``torch.distributed.checkpoint``'s
    ``set_optimizer_state_dict`` drops extra keys) and laid out for this world size already."""
    if sharded:
        meta = state_dict.get(FORMAT_KEY)
        if meta is not None and not meta.get("sharded"):
            raise ValueError(
                "this optimizer's parameters are sharded by FSDP2, but the state dict was saved "
                f"by a {meta.get('world_size')}-rank run without FSDP2; save and load FSDP2 "
                "optimizer state with torch.distributed.checkpoint (get/set_state_dict)"
            )
        return {k: v for k, v in state_dict.items() if k != FORMAT_KEY}
    loaded = _prepare_to_load(shards, state_dict)
    if LAYOUT_KEY not in loaded["state"]:
        check_state_fits(shards, loaded, whole=False)
    return loaded


def _prepare_to_load(shards: Shards, state_dict: dict[str, Any]) -> dict[str, Any]:
    rank, world_size = shards.comm.rank, shards.comm.world_size
    meta = state_dict.get(FORMAT_KEY)
    body = {k: v for k, v in state_dict.items() if k != FORMAT_KEY}
    layout = state_dict["state"].get(LAYOUT_KEY)
    if layout is not None:  # an engine's per-rank flattened state
        if layout["world_size"] != world_size:
            raise layout_world_size_error(layout, rank, world_size)
        if meta is not None and meta.get("rank", rank) != rank:
            raise shard_state_dict_error(meta["rank"], meta["world_size"], rank, world_size)
        return body
    if meta is None:
        _check_unmarked(shards, state_dict)
        return body
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"optimizer state dict format {meta.get('format')!r} is not {FORMAT_VERSION}: it was "
            "saved by another version of gnlorp_dist; save it again with this version"
        )
    if not meta["consolidated"]:
        if (meta["rank"], meta["world_size"]) != (rank, world_size):
            raise shard_state_dict_error(meta["rank"], meta["world_size"], rank, world_size)
        return body
    if world_size == 1:
        return body
    check_state_fits(shards, body, whole=True)  # before cutting rows out of it
    return _this_ranks_shard(shards, body)


def check_state_fits(shards: Shards, body: dict[str, Any], *, whole: bool) -> None:
    """A ValueError, naming the parameter and both shapes, when ``body`` (torch's state dict
    format) was saved for other parameters: another number of groups or of parameters in a
    group, projected moments or a projection basis of another shape, dense moments of another
    shape. ``whole``: the dense moments are the whole parameter's (a consolidated state dict),
    else this rank's row block. The shapes follow the saved groups' ``rank`` and ``proj_type``
    (what the optimizer steps with once loaded)."""
    saved_groups, table = body["param_groups"], shards.table
    if len(saved_groups) != len(table.groups):
        raise ValueError(
            f"the optimizer state dict has {len(saved_groups)} parameter groups, this optimizer "
            f"{len(table.groups)}: it was saved for another model or other parameter groups"
        )
    for group_index, (saved, group) in enumerate(zip(saved_groups, table.groups)):
        saved_ids, params = group_params(saved), group_params(group)
        spec = table.specs[group_index]
        if len(saved_ids) != len(params):
            names = spec.param_names
            which = f" ({names[0]} ... {names[-1]})" if names else ""
            raise ValueError(
                f"param_groups[{group_index}]{which}: the optimizer state dict holds "
                f"{len(saved_ids)} parameters for this group, this optimizer "
                f"{len(params)}: it was saved for another model or other parameter groups"
            )
        for index, (saved_id, param) in enumerate(zip(saved_ids, params)):
            entry = body["state"].get(saved_id)
            if not entry:
                continue
            for key, expected in _expected_shapes(shards, saved, param, entry, whole).items():
                value = entry.get(key)
                if torch.is_tensor(value) and tuple(value.shape) != expected:
                    raise ValueError(
                        f"{spec.name(group_index, index)}: the optimizer state dict's {key!r} "
                        f"has shape {tuple(value.shape)} but this optimizer's parameter of shape "
                        f"{tuple(param.shape)} needs {expected}: it was saved for another model "
                        "(or another rank / projection type); load it into the model it was "
                        "saved from"
                    )


def _expected_shapes(
    shards: Shards,
    saved_group: dict[str, Any],
    param: torch.Tensor,
    entry: dict[str, Any],
    whole: bool,
) -> dict[str, tuple[int, ...]]:
    """The shapes ``entry``'s tensors must have for ``param`` under ``saved_group``."""
    projection = projection_of(saved_group)
    if projection is not None:
        if "proj" not in entry:
            return {}  # no subspace yet: nothing to compare
        if param.dim() != 2:
            return {"proj": ()}  # a projected state for a parameter that is not a matrix
        if projection.granularity > 1 and param.shape[1] % projection.granularity:
            return {"proj": ()}  # saved for matrices of another width
        rank = projection.rank
        shape = projection.projected_shape(tuple(param.shape))
        side = projection.side(tuple(param.shape))
        moments = low_rank_shape(shape, rank, side)
        basis = projection_shape(shape, min(rank, *shape), side)
        if "proj_scale" in entry:  # proj_bits: INT4 codes pack two per byte
            basis = stored_shape(basis, 4 if entry["proj"].dtype == torch.uint8 else 8)
        return {"proj": basis, "exp_avg": moments, "exp_avg_sq": moments}
    shape = tuple(param.shape)
    if not whole and shards.comm.world_size > 1:
        if not shards.owns(param):
            return {}
        block = shards.owned_block(param)
        if not block.whole:
            shape = (block.row_stop - block.row_start, *shape[1:])
    return {"exp_avg": shape, "exp_avg_sq": shape}


def _saved_ids(body: dict[str, Any]) -> list[Any]:
    return [i for group in body["param_groups"] for i in group_params(group)]


def _check_unmarked(shards: Shards, state_dict: dict[str, Any]) -> None:
    """A state dict without our marker (older versions): one rank's shard, whose rank and world
    size are unknown. Accepted on one process only, where a dense tensor's moments must cover
    all its rows (a row block betrays a shard of a several-rank save)."""
    world_size = shards.comm.world_size
    if world_size > 1:
        raise unmarked_state_dict_error(world_size, None)
    for saved_id, param in zip(_saved_ids(state_dict), shards.params()):
        entry = state_dict["state"].get(saved_id, {})
        moment = entry.get("exp_avg")
        if "proj" not in entry and torch.is_tensor(moment) and moment.shape != param.shape:
            raise unmarked_state_dict_error(world_size, (tuple(moment.shape), tuple(param.shape)))


def _this_ranks_shard(shards: Shards, body: dict[str, Any]) -> dict[str, Any]:
    """A consolidated state dict cut to the blocks this rank owns."""
    params = shards.params()
    saved_ids = _saved_ids(body)
    if len(saved_ids) != len(params):
        raise ValueError(
            f"the optimizer state dict holds {len(saved_ids)} parameters, this optimizer "
            f"{len(params)}: it was saved for another model or other parameter groups"
        )
    shard: dict[Any, dict[str, Any]] = {}
    for saved_id, param, bits in zip(saved_ids, params, _bits(body["param_groups"])):
        entry = body["state"].get(saved_id)
        if entry is None:
            continue
        if not shards.owns(param):
            replica = shards.replica_state(param, entry)
            if replica is not None:
                shard[saved_id] = replica
            continue
        block = shards.owned_block(param)
        if block.whole:
            shard[saved_id] = entry
        else:
            shard[saved_id] = rows_of_state(
                entry, block.row_start, block.row_stop, bits, param.dtype
            )
    return {**body, "state": shard}


def restore_saved_dtypes(
    shards: Shards, state: MutableMapping[Any, Any], loaded: dict[str, Any]
) -> None:
    """Undo torch's cast of every loaded state tensor to its parameter's dtype: ours keep the
    dtype they were saved in (uint8 codes, float32 block scales)."""
    for saved_id, param in zip(_saved_ids(loaded), shards.params(), strict=True):
        for key, value in loaded["state"].get(saved_id, {}).items():
            if torch.is_tensor(value) and state[param][key].dtype != value.dtype:
                state[param][key] = value.to(device=param.device, copy=True)
