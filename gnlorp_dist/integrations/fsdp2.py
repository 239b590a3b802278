"""GradNormLoRPAdamW under FSDP2 (``torch.distributed.fsdp.fully_shard``): the row layout.

FSDP2 keeps each parameter where it was, as a ``DTensor`` sharded by rows over the ranks, and
hands the optimizer row-sharded, already averaged gradients. So each rank holds a block of rows
of every matrix, a run that starts and ends on row boundaries, and the driver
(:mod:`gnlorp_dist.optim.driver`) needs no full matrix except at a refresh:

- a right-projected matrix (``R = G P^T``, most of a LLaMA) updates its rows alone: each rank
  projects its rows, keeps the moments of its rows and back-projects them; nothing travels
  between refreshes;
- a left-projected matrix (``R = P^T G``: ``down_proj``) sums ``r x n`` partial products over the
  ranks' rows onto its owner, which keeps the moments and broadcasts the low-rank direction;
- dense tensors (embeddings, norms, weight-norm magnitudes, which are row-aligned with ``V``)
  update their own rows, like ``torch.optim.AdamW`` on FSDP2.

At a refresh the due matrix's rows are summed onto its owner (the one SVD in the job) and the
basis broadcast. ``optimizer.state_dict()`` hands the row-sharded states out as DTensors, so
``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict``, which Accelerate's
FSDP2 path uses) saves every rank's part and reshards it to another number of ranks.

Refused before the first step, naming the option: FSDP1 (flat parameters), placements other
than ``Shard(0)`` on a 1-D mesh (HSDP, tensor parallelism), per-layer updates. 8-bit states run
on the block grid (rows cut inside 8-bit blocks match one process; tests/distributed/test_fsdp2.py).
``import gnlorp_dist`` hands :func:`detect_fsdp2_layout` to the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from gnlorp_dist.distributed.dtensor import (
    is_dtensor,
    is_fsdp1_parameter,
    local_part,
    mesh_rank_and_size,
    row_range,
    row_sharding_problem,
    sharded_like,
)
from gnlorp_dist.optim.fragments import Fragment, ModelParameter
from gnlorp_dist.optim.layouts import Layout, LayoutDefaults
from gnlorp_dist.optim.projection import low_rank_shape, projection_side
from gnlorp_dist.optim.quantized import MOMENT_KEYS, MomentStore


class Fsdp2Layout(LayoutDefaults):
    """FSDP2's row blocks: rank ``k`` holds rows ``torch.chunk`` gives it of every parameter."""

    name = "FSDP2"
    replicated = False
    averaged = True
    row_aligned = True
    flattened = False

    def true_shape(self, param: Tensor) -> tuple[int, ...]:
        return tuple(param.shape)  # a DTensor's shape is the global one

    def check_group(self, group: dict[str, Any], group_index: int) -> None:
        """VLoRP's options are not wired into FSDP2's sharded state (its DTensor moments are
        sized by the true shape's rows, and ProjFactor's column sums would need every rank's
        rows): refused here, before any step, rather than run wrong."""
        asked = {
            key: group[key]
            for key, plain in (("granularity", 1), ("proj_type", None), ("second_moment", "adam"))
            if key in group
            and group[key] != plain
            and (key != "proj_type" or group[key] == "random")
        }
        if "rank" in group and asked:
            raise ValueError(
                f"param_groups[{group_index}]: {asked} is not supported under FSDP2 yet "
                "(VLoRP granularity, random bases and ProjFactor run on one process, DDP, the "
                "low-rank reduction and DeepSpeed ZeRO); drop these options under FSDP2, or "
                "train with DDP or ZeRO"
            )

    def fragments(
        self, params: list[ModelParameter], engine_params: list[Tensor], rank: int, world_size: int
    ) -> list[Fragment | None]:
        fragments: list[Fragment | None] = []
        for param in params:
            tensor = param.tensor
            mesh_rank, mesh_size = mesh_rank_and_size(tensor)  # type: ignore[arg-type]
            if mesh_size != world_size:
                raise ValueError(
                    f"{param.name}: sharded by FSDP2 over {mesh_size} ranks, but the optimizer's "
                    f"communicator spans {world_size}; build GradNormLoRPAdamW with a "
                    "communicator over the mesh's process group (or shard over every rank)"
                )
            if tensor.grad is None:
                fragments.append(None)
                continue
            first, stop = row_range(param.shape[0], mesh_rank, mesh_size)
            cols = math.prod(param.shape[1:])
            master = local_part(tensor)
            assert master.shape[0] == stop - first, (param.name, master.shape, first, stop)
            if stop == first or cols == 0:
                fragments.append(None)
                continue
            fragments.append(
                Fragment(
                    start=first * cols,
                    numel=(stop - first) * cols,
                    grad=local_part(tensor.grad).reshape(-1),
                    master=master.view(-1),  # a view: updates land in FSDP2's sharded storage
                )
            )
        return fragments

    def state_for_saving(
        self, param: ModelParameter, group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        shape = _sharded_moment_shape(param, group)
        if shape is None:
            return dict(state)
        saved = {key: value for key, value in state.items() if not key.endswith("_absmax")}
        first, stop = row_range(shape[0], *mesh_rank_and_size(param.tensor))  # type: ignore[arg-type]
        if "exp_avg_absmax" in state:
            # 8-bit codes are saved as their float values: a block's scale may span two ranks'
            # rows, which no DTensor placement describes. The first step after loading reads the
            # floats (exactly the decoded codes) and quantises them again on the same grid.
            moments = MomentStore(state, 8, offset=first * math.prod(shape[1:]))
            saved["exp_avg"], saved["exp_avg_sq"] = moments.load()
        for key in MOMENT_KEYS:
            if key in saved:
                local = saved[key].reshape(stop - first, *shape[1:])
                saved[key] = sharded_like(local, param.tensor, shape)  # type: ignore[arg-type]
        return saved

    def state_from_loading(
        self, param: ModelParameter, group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        loaded = {
            key: local_part(value) if is_dtensor(value) else value for key, value in state.items()
        }
        if "rank" not in group:
            for key in MOMENT_KEYS:
                if key in loaded:
                    loaded[key] = loaded[key].reshape(-1)  # the driver's runs are flat
        return loaded


def _sharded_moment_shape(param: ModelParameter, group: dict[str, Any]) -> tuple[int, ...] | None:
    """The global shape of ``param``'s moments when they are sharded with its rows, else None
    (a left-projected matrix's moments sit whole on its owner)."""
    if "rank" not in group:
        return param.shape
    side = projection_side(param.shape, group["proj_type"])
    if side == "right":
        return low_rank_shape(param.shape, group["rank"], side)
    return None


def detect_fsdp2_layout(model_params: list[Tensor], engine_params: list[Tensor]) -> Layout | None:
    """The FSDP2 layout of a group of DTensor parameters, None for plain ones; a ValueError for
    FSDP1 or a sharding other than FSDP2's rows on one mesh dimension."""
    for param in engine_params:
        if is_fsdp1_parameter(param):
            raise ValueError(
                "GradNormLoRPAdamW got FSDP1 flat parameters (FullyShardedDataParallel): their "
                "matrices are flattened and cut across ranks, so there is no 2-D gradient to "
                "project. Shard with FSDP2 instead (torch.distributed.fsdp.fully_shard; "
                "Accelerate: fsdp_version: 2), or use DDP / DeepSpeed ZeRO"
            )
    dtensors = [p for p in engine_params if is_dtensor(p)]
    if not dtensors:
        return None
    if len(dtensors) != len(engine_params):
        raise ValueError(
            f"a param group mixes {len(dtensors)} FSDP2-sharded parameters with "
            f"{len(engine_params) - len(dtensors)} plain ones: shard the whole model with "
            "fully_shard (each decoder layer, then the root) before building the optimizer"
        )
    for param in dtensors:
        problem = row_sharding_problem(param)  # type: ignore[arg-type]
        if problem is not None:
            raise ValueError(
                f"GradNormLoRPAdamW under FSDP2 supports row sharding (Shard(0)) over one mesh "
                f"dimension; a parameter of shape {tuple(param.shape)} has {problem}. Use plain "
                "fully_shard(module) over all ranks"
            )
    return Fsdp2Layout()
