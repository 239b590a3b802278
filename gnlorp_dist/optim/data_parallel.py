"""What a data-parallel step does to gradients before the driver runs: checks and reductions.

Replicated layouts (every rank holds every parameter whole) get their gradients either averaged
by DDP, or here: each ownership block's gradient summed onto its owner
(:func:`reduce_to_owners`), the ZeRO-1 pattern that, with the owners' broadcast of the updated
rows, moves what one all-reduce moves. A lookup table's gradient (an embedding's) sends only the
rows some rank's batch touched (:mod:`gnlorp_dist.optim.sparse_rows`; exact, the others are zero).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from gnlorp_dist.nn.surgery import was_merged_away
from gnlorp_dist.optim.comm import Communicator, Handle, wait_all
from gnlorp_dist.optim.fragments import ModelParameter
from gnlorp_dist.optim.group_step import GroupStep
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.sparse_rows import reduce_touched_rows_to_owners
from gnlorp_dist.optim.validation import flat_gradient_error, merged_away_error


def check_replicated_gradients(projected: bool, params: list[ModelParameter]) -> None:
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
        if projected and grad.dim() != 2:
            raise flat_gradient_error(param.name, grad)


def reduce_to_owners(
    exchange: OwnerExchange,
    tensor: Tensor,
    blocks: list[OwnedBlock],
    handles: list[Handle | None],
) -> list[Tensor]:
    """Start summing each block of ``tensor.grad`` onto its owner (bucketed by ``exchange``);
    returns the blocks this rank owns (to average once ``exchange`` and the handles are waited
    for). A table whose touched rows are few sends only those
    (:func:`~gnlorp_dist.optim.sparse_rows.reduce_touched_rows_to_owners`)."""
    assert tensor.grad is not None
    touched = reduce_touched_rows_to_owners(exchange, tensor, blocks, handles)
    if touched is not None:
        return touched
    owned = []
    for block in blocks:
        rows = tensor.grad if block.whole else tensor.grad[block.row_start : block.row_stop]
        handles.append(exchange.reduce_sum(rows, dst=block.owner))
        if block.owner == exchange.comm.rank:
            owned.append(rows)
    return owned


def reduce_gradients_to_owners(
    steps: list[GroupStep],
    comm: Communicator,
    take_started: Callable[[Tensor], list[Tensor] | None] | None = None,
) -> None:
    """Replicated layouts without DDP: each block's gradient summed on its owner, then
    averaged there, instead of DDP's all-reduce to every rank. ``take_started``: the rows whose
    reduce already started inside backward (:mod:`gnlorp_dist.optim.backward_reduction`)."""
    if comm.world_size == 1:
        return
    exchange = OwnerExchange(comm)
    handles: list[Handle | None] = []
    owned: list[Tensor] = []
    for group_step in steps:
        if not group_step.layout.replicated:
            continue
        if group_step.projected and not group_step.layout.averaged:
            continue  # low-rank reduction: only the projected gradients travel, in the step
        for i, param in enumerate(group_step.params):
            if not group_step.active[i]:
                continue
            started = take_started(param.tensor) if take_started is not None else None
            if started is not None:  # its reduce started inside backward
                owned += started
            else:
                owned += reduce_to_owners(exchange, param.tensor, group_step.blocks[i], handles)
    exchange.wait()
    wait_all(handles)
    for rows in owned:
        rows.div_(comm.world_size)
