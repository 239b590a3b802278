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
from collections.abc import Callable
from typing import Any

import torch

from gnlorp_dist.optim.fragment_state import LAYOUT_KEY
from gnlorp_dist.optim.fragments import ModelParameter
from gnlorp_dist.optim.layouts import Layout, detect_layout
from gnlorp_dist.optim.projection import low_rank_shape, projection_shape
from gnlorp_dist.optim.projector import group_side, projected_shape
from gnlorp_dist.optim.quantized_basis import stored_shape
from gnlorp_dist.optim.reshard import join_states, rows_of_state, saved_state
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


def is_flattened(optimizer: StateDictMethods) -> bool:
    """Whether an engine (DeepSpeed ZeRO) flattened the groups: then the state stays per rank."""
    return LAYOUT_KEY in optimizer.state or any(lay.flattened for lay in optimizer.layouts())


def with_marker(optimizer: StateDictMethods, local: dict[str, Any]) -> dict[str, Any]:
    """``local`` (torch's ``state_dict()`` of this rank) marked: the whole state on one process,
    this rank's shard of flattened groups."""
    comm = optimizer.comm
    if comm.world_size == 1:
        return {**local, FORMAT_KEY: marker(consolidated=True, rank=None, world_size=1)}
    return {
        **local,
        FORMAT_KEY: marker(consolidated=False, rank=comm.rank, world_size=comm.world_size),
    }


def _flat_params(optimizer: StateDictMethods) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def _bits(groups: list[dict[str, Any]]) -> list[int]:
    return [group["bits"] for group in groups for _param in group["params"]]


def consolidate(optimizer: StateDictMethods, local: dict[str, Any]) -> dict[str, Any]:
    """The whole job's state dict from this rank's ``local`` (torch's ``state_dict()`` of it).

    A collective: every rank gathers every rank's blocks (all_gather_object of CPU tensors), so
    each holds the full state for a moment.
    """
    params = _flat_params(optimizer)
    pieces = []
    for index, state in local["state"].items():
        if not optimizer.owns(params[index]):
            continue  # a replica (basis and step counter) whose owner saves the whole state
        block = optimizer.owned_block(params[index])
        pieces.append((index, block.row_start, block.row_stop, block.whole, saved_state(state)))
    by_index: dict[int, list[tuple[int, int, bool, dict[str, Any]]]] = {}
    for rank_pieces in optimizer.comm.all_gather_object(pieces):
        for index, start, stop, whole, state in rank_pieces:  # type: ignore[attr-defined]
            by_index.setdefault(index, []).append((start, stop, whole, state))
    bits = _bits(optimizer.param_groups)
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
        FORMAT_KEY: marker(consolidated=True, rank=None, world_size=optimizer.comm.world_size),
    }


def sharded_state_dict(optimizer: StateDictMethods, local: dict[str, Any]) -> dict[str, Any]:
    """Parameters sharded in place (FSDP2): this rank's ``local`` state with every sharded
    tensor handed out as its layout describes it (a DTensor), the form
    ``torch.distributed.checkpoint`` saves from every rank and reshards on load."""
    named = optimizer.named_model_parameters()  # in param_groups order: torch's indices
    state = {}
    for index, entry in local["state"].items():
        param, layout, group = named[index]
        state[index] = layout.state_for_saving(param, group, entry)
    marked = marker(consolidated=False, rank=None, world_size=optimizer.comm.world_size)
    marked["sharded"] = True
    return {**local, "state": state, FORMAT_KEY: marked}


def unwrap_sharded_state(optimizer: StateDictMethods) -> None:
    """After a load into parameters sharded in place: each state back in the local form the
    driver works on (the inverse of :func:`sharded_state_dict`)."""
    for param, layout, group in optimizer.named_model_parameters():
        if param.tensor in optimizer.state:
            optimizer.state[param.tensor] = layout.state_from_loading(
                param, group, optimizer.state[param.tensor]
            )


def prepare_to_load(
    optimizer: StateDictMethods, state_dict: dict[str, Any], *, sharded: bool = False
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
    loaded = _prepare_to_load(optimizer, state_dict)
    if LAYOUT_KEY not in loaded["state"]:
        check_state_fits(optimizer, loaded, whole=False)
    return loaded


def _prepare_to_load(optimizer: StateDictMethods, state_dict: dict[str, Any]) -> dict[str, Any]:
    rank, world_size = optimizer.comm.rank, optimizer.comm.world_size
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
        _check_unmarked(optimizer, state_dict)
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
    check_state_fits(optimizer, body, whole=True)  # before cutting rows out of it
    return _this_ranks_shard(optimizer, body)


def _param_names(optimizer: StateDictMethods) -> list[str]:
    names = []
    for group_index, group in enumerate(optimizer.param_groups):
        given = group.get("param_names")
        for index in range(len(group["params"])):
            names.append(given[index] if given else f"param_groups[{group_index}][{index}]")
    return names


def check_state_fits(optimizer: StateDictMethods, body: dict[str, Any], *, whole: bool) -> None:
    """A ValueError, naming the parameter and both shapes, when ``body`` (torch's state dict
    format) was saved for other parameters: another number of groups or of parameters in a
    group, projected moments or a projection basis of another shape, dense moments of another
    shape. ``whole``: the dense moments are the whole parameter's (a consolidated state dict),
    else this rank's row block. The shapes follow the saved groups' ``rank`` and ``proj_type``
    (what the optimizer steps with once loaded)."""
    saved_groups, groups = body["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"the optimizer state dict has {len(saved_groups)} parameter groups, this optimizer "
            f"{len(groups)}: it was saved for another model or other parameter groups"
        )
    names = iter(_param_names(optimizer))
    for group_index, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            group_names = group.get("param_names")
            which = f" ({group_names[0]} ... {group_names[-1]})" if group_names else ""
            raise ValueError(
                f"param_groups[{group_index}]{which}: the optimizer state dict holds "
                f"{len(saved['params'])} parameters for this group, this optimizer "
                f"{len(group['params'])}: it was saved for another model or other parameter groups"
            )
        for saved_id, param in zip(saved["params"], group["params"]):
            name = next(names)
            entry = body["state"].get(saved_id)
            if not entry:
                continue
            for key, expected in _expected_shapes(optimizer, saved, param, entry, whole).items():
                value = entry.get(key)
                if torch.is_tensor(value) and tuple(value.shape) != expected:
                    raise ValueError(
                        f"{name}: the optimizer state dict's {key!r} has shape "
                        f"{tuple(value.shape)} but this optimizer's parameter of shape "
                        f"{tuple(param.shape)} needs {expected}: it was saved for another model "
                        "(or another rank / projection type); load it into the model it was "
                        "saved from"
                    )


def _expected_shapes(
    optimizer: StateDictMethods,
    saved_group: dict[str, Any],
    param: torch.Tensor,
    entry: dict[str, Any],
    whole: bool,
) -> dict[str, tuple[int, ...]]:
    """The shapes ``entry``'s tensors must have for ``param`` under ``saved_group``."""
    rank = saved_group.get("rank")
    if rank is not None:
        if "proj" not in entry:
            return {}  # no subspace yet: nothing to compare
        if param.dim() != 2:
            return {"proj": ()}  # a projected state for a parameter that is not a matrix
        saved = {"proj_type": "std", **saved_group}
        if saved_group.get("granularity", 1) > 1 and param.shape[1] % saved["granularity"]:
            return {"proj": ()}  # saved for matrices of another width
        shape = projected_shape(tuple(param.shape), saved)
        side = group_side(tuple(param.shape), saved)
        moments = low_rank_shape(shape, rank, side)
        basis = projection_shape(shape, min(rank, *shape), side)
        if "proj_scale" in entry:  # proj_bits: INT4 codes pack two per byte
            basis = stored_shape(basis, 4 if entry["proj"].dtype == torch.uint8 else 8)
        return {"proj": basis, "exp_avg": moments, "exp_avg_sq": moments}
    shape = tuple(param.shape)
    if not whole and optimizer.comm.world_size > 1:
        if not optimizer.owns(param):
            return {}
        block = optimizer.owned_block(param)
        if not block.whole:
            shape = (block.row_stop - block.row_start, *shape[1:])
    return {"exp_avg": shape, "exp_avg_sq": shape}


def _check_unmarked(optimizer: StateDictMethods, state_dict: dict[str, Any]) -> None:
    """A state dict without our marker (older versions): one rank's shard, whose rank and world
    size are unknown. Accepted on one process only, where a dense tensor's moments must cover
    all its rows (a row block betrays a shard of a several-rank save)."""
    world_size = optimizer.comm.world_size
    if world_size > 1:
        raise unmarked_state_dict_error(world_size, None)
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    for saved_id, param in zip(saved_ids, _flat_params(optimizer)):
        entry = state_dict["state"].get(saved_id, {})
        moment = entry.get("exp_avg")
        if "proj" not in entry and torch.is_tensor(moment) and moment.shape != param.shape:
            raise unmarked_state_dict_error(world_size, (tuple(moment.shape), tuple(param.shape)))


def _this_ranks_shard(optimizer: StateDictMethods, body: dict[str, Any]) -> dict[str, Any]:
    """A consolidated state dict cut to the blocks this rank owns."""
    params = _flat_params(optimizer)
    saved_ids = [i for group in body["param_groups"] for i in group["params"]]
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
        if not optimizer.owns(param):
            replica = optimizer.replica_state(param, entry)
            if replica is not None:
                shard[saved_id] = replica
            continue
        block = optimizer.owned_block(param)
        if block.whole:
            shard[saved_id] = entry
        else:
            shard[saved_id] = rows_of_state(
                entry, block.row_start, block.row_stop, bits, param.dtype
            )
    return {**body, "state": shard}


def restore_saved_dtypes(optimizer: StateDictMethods, loaded: dict[str, Any]) -> None:
    """Undo torch's cast of every loaded state tensor to its parameter's dtype: ours keep the
    dtype they were saved in (uint8 codes, float32 block scales)."""
    saved_ids = [i for group in loaded["param_groups"] for i in group["params"]]
    for saved_id, param in zip(saved_ids, _flat_params(optimizer), strict=True):
        for key, value in loaded["state"].get(saved_id, {}).items():
            if torch.is_tensor(value) and optimizer.state[param][key].dtype != value.dtype:
                optimizer.state[param][key] = value.to(device=param.device, copy=True)


class StateDictMethods:
    """``state_dict()`` and ``load_state_dict()`` of :class:`GradNormLoRPAdamW` in the formats
    above; a mixin (its methods run on the optimizer itself).

    The functions above take the optimizer as a ``StateDictMethods``: what they use of it is
    declared here, so this module needs no import of :mod:`gnlorp_dist.optim.adamw` (which
    imports this one) to name its type."""

    # Provided by GradNormLoRPAdamW.
    owns: Callable[[torch.Tensor], bool]
    owned_block: Callable[[torch.Tensor], Any]
    replica_state: Callable[[torch.Tensor, dict[str, Any]], dict[str, Any] | None]
    comm: Any
    state: Any
    param_groups: Any
    groups_at_construction: Any
    model_params: Any
    _consolidated: Any
    _lookup: Any
    _construction_index: Any
    _model_parameters: Any

    # -- saving and loading (the formats: gnlorp_dist.optim.state_dict) ------------------

    def consolidate_state_dict(self) -> dict[str, Any]:
        """Gather the whole job's state (a collective: EVERY rank calls it), cache and return it.

        :meth:`state_dict` then returns it on any rank without communicating, until the next
        ``step()``, ``step_parameter()`` or ``load_state_dict()``: call this on every rank before
        a rank-0-only save (``transformers.Trainer``). Cost: one ``all_gather_object`` of every
        rank's state (CPU tensors); each rank holds the full state in host memory while cached.
        A rank whose peers do not join within ``$GNLORP_STATE_DICT_TIMEOUT_S`` seconds (default
        60) raises a ValueError naming the fix instead of hanging. Under DeepSpeed ZeRO
        (flattened groups) nothing is gathered: this rank's shard is returned, as state_dict().
        """
        if self.comm.world_size > 1 and (is_flattened(self) or self._sharded_in_place()):
            return self.state_dict()  # ZeRO, FSDP2: every rank saves its own shard
        wait_for_every_rank(self.comm)
        self._consolidated = consolidate(self, super().state_dict())
        return self._consolidated

    def drop_consolidated_state(self) -> None:
        """Free the state cached by :meth:`consolidate_state_dict` (after the save)."""
        self._consolidated = None

    def state_dict(self) -> dict[str, Any]:
        """The whole job's optimizer state, the same on every rank and for any world size.

        Torch's format plus ``"gnlorp": {"format": 1, "consolidated": True, "world_size": N}``;
        tensors and plain values only (``torch.load(weights_only=True)``). One process: torch's
        ``state_dict()``. Several ranks: the state cached by :meth:`consolidate_state_dict`
        since the last step, else this call consolidates, which needs EVERY rank to call it
        (``accelerate``'s ``save_state`` does); called on one rank alone it raises a ValueError
        after ``$GNLORP_STATE_DICT_TIMEOUT_S`` seconds (default 60) instead of hanging. Under
        DeepSpeed ZeRO (flattened groups; the engine saves one per rank): this rank's shard,
        marked ``"consolidated": False`` with its rank and world size.
        """
        if self._sharded_in_place():
            return sharded_state_dict(self, super().state_dict())
        if self.comm.world_size == 1 or is_flattened(self):
            return with_marker(self, super().state_dict())
        if self._consolidated is None:
            self.consolidate_state_dict()
        assert self._consolidated is not None
        return self._consolidated

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` saved on any number of ranks, keeping this rank's shard.

        A state dict holding one rank's shard only (a ZeRO rank's, or one saved by an older
        gnlorp_dist) is refused with a ValueError unless it belongs to this rank and world size.
        """
        sharded = self._sharded_in_place()
        loaded = prepare_to_load(self, state_dict, sharded=sharded)
        self._consolidated = None
        super().load_state_dict(loaded)
        # torch rebuilt the group dicts; the new ones are what engines step from now on.
        self.groups_at_construction = list(self.param_groups)
        self._lookup = None
        if sharded:
            unwrap_sharded_state(self)
        restore_saved_dtypes(self, loaded)

    def layouts(self) -> list[Layout]:
        """The layout of each group as the engine holds it now (empty groups skipped)."""
        found = []
        for group in self.param_groups:
            if group["params"]:
                index = self._construction_index(group)
                found.append(detect_layout(self.model_params[index], list(group["params"])))
        return found

    def _sharded_in_place(self) -> bool:
        """Whether the parameters are sharded where they are (FSDP2), not replaced (ZeRO)."""
        return any(not (lay.replicated or lay.flattened) for lay in self.layouts())

    def named_model_parameters(self) -> list[tuple[ModelParameter, Layout, dict[str, Any]]]:
        """Every parameter with its true shape and name, its group's layout and its group."""
        found = []
        for index, group in enumerate(self.groups_at_construction):
            stepped = list(group["params"])
            layout = detect_layout(self.model_params[index], stepped)
            params = self._model_parameters(index, None if layout.flattened else stepped)
            found += [(param, layout, group) for param in params]
        return found
