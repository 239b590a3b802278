"""What a data-parallel step does to gradients before the driver runs: checks and reductions.

Replicated layouts (every rank holds every parameter whole) get their gradients either averaged
by DDP, or here: each ownership block's gradient summed onto its owner
(:func:`reduce_to_owners`), the ZeRO-1 pattern that, with the owners' broadcast of the updated
rows, moves what one all-reduce moves.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gnlorp_dist.nn.surgery import was_merged_away
from gnlorp_dist.optim.comm import Communicator, Handle
from gnlorp_dist.optim.fragments import ModelParameter
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.validation import flat_gradient_error, merged_away_error


def check_replicated_gradients(group: dict[str, Any], params: list[ModelParameter]) -> None:
    """What a replicated step refuses before it starts: a parameter merged away by
    :func:`~gnlorp_dist.merge_weight_norm`, a sparse gradient, a projected gradient that is not
    a matrix (an engine flattened it behind the optimizer's back)."""
    for param in params:
        if was_merged_away(param.tensor):
            raise merged_away_error(param.name)
        grad = param.tensor.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise ValueError("GradNormLoRPAdamW does not support sparse gradients")
        if "rank" in group and grad.dim() != 2:
            raise flat_gradient_error(param.name, grad)


def reduce_to_owners(
    comm: Communicator, tensor: Tensor, blocks: list[OwnedBlock], handles: list[Handle | None]
) -> list[Tensor]:
    """Start summing each block of ``tensor.grad`` onto its owner; returns the blocks this rank
    owns (to average once the handles are waited for)."""
    assert tensor.grad is not None
    owned = []
    for block in blocks:
        rows = tensor.grad if block.whole else tensor.grad[block.row_start : block.row_stop]
        handles.append(comm.reduce_sum(rows, dst=block.owner))
        if block.owner == comm.rank:
            owned.append(rows)
    return owned
