"""The DTensor facts the FSDP2 layout needs (``torch.distributed.tensor`` stays in this package).

FSDP2 (``fully_shard``) turns every parameter into a ``DTensor`` sharded by rows
(``Shard(0)``) over a 1-D device mesh, with ``torch.chunk``'s cut: ``ceil(M / W)`` rows per rank,
the last ranks holding fewer (or none).
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.distributed.tensor import DTensor, Shard


def is_dtensor(tensor: object) -> bool:
    return isinstance(tensor, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """This rank's local tensor of a DTensor (the storage FSDP2 trains), else ``tensor``."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_fsdp1_parameter(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a FSDP1 ``FlatParameter`` or a view into one (``use_orig_params``)."""
    return bool(
        getattr(tensor, "_is_flat_param", False) or getattr(tensor, "_fsdp_flattened", False)
    )


def row_sharding_problem(tensor: DTensor) -> str | None:
    """Why ``tensor``'s sharding is not FSDP2's plain row sharding over one mesh dimension (a
    message naming the placements), or None when it is."""
    mesh = tensor.device_mesh
    if mesh.ndim != 1:
        return (
            f"a {mesh.ndim}-D device mesh {tuple(mesh.shape)} with placements "
            f"{tensor.placements} (HSDP or tensor parallelism)"
        )
    if tuple(tensor.placements) != (Shard(0),):
        return f"placements {tensor.placements} (only FSDP2's Shard(0) is supported)"
    return None


def mesh_rank_and_size(tensor: DTensor) -> tuple[int, int]:
    """This rank's coordinate on ``tensor``'s 1-D mesh, and the mesh's size."""
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    assert coordinate is not None, "this rank is not on the parameter's mesh"
    return coordinate[0], mesh.size()


def row_range(rows: int, mesh_rank: int, mesh_size: int) -> tuple[int, int]:
    """``[first, stop)``: the rows ``torch.chunk`` (and so ``Shard(0)``) gives ``mesh_rank``."""
    per_rank = math.ceil(rows / mesh_size) if rows else 0
    first = min(mesh_rank * per_rank, rows)
    return first, min(first + per_rank, rows)


def sharded_like(local: Tensor, like: DTensor, shape: tuple[int, ...]) -> DTensor:
    """``local`` (this rank's rows of a ``shape`` tensor) as a DTensor row-sharded on ``like``'s
    mesh: the form ``torch.distributed.checkpoint`` saves from every rank and reshards."""
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(
        local, like.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride
    )
