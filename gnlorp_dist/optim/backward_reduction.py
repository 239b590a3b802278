"""Low-rank reductions started inside the backward pass, so they overlap it (as DDP's buckets do).

Under the low-rank gradient reduction (``gradient_reduction="low_rank"``, the model not in DDP)
the gradient of a projected matrix is final as soon as autograd has accumulated it in the last
micro-batch. A post-accumulate-grad hook then projects it with the shared basis and starts the
asynchronous reduce of the ``M x r`` (or ``r x N``) result to the matrix's owner, and a dense
parameter's row blocks start their reduce to their owners, while backward goes on through the
layers below. ``step()`` then only waits for what is in flight.

The hooks are armed for one backward pass by :meth:`BackwardReduction.armed` (the training loop
arms the last micro-batch's; earlier micro-batches accumulate locally, like DDP's ``no_sync``).
A matrix whose subspace is due at this step is left to ``step()`` (its full gradient goes to the
owner for the SVD first). Hooks fire in the same order on every rank (the models are the same),
so the collectives they start pair up. A lookup table's hook (the input embedding's, the last to
fire) agrees on its touched rows first and reduces only those
(:mod:`gnlorp_dist.optim.sparse_rows`: one mask all-reduce and one host read, inside the hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from gnlorp_dist.optim.comm import Communicator, Handle, buffer_device, wait_all
from gnlorp_dist.optim.data_parallel import reduce_to_owners
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.param_table import ParamTable
from gnlorp_dist.optim.projection import project
from gnlorp_dist.optim.projector import regenerate_basis
from gnlorp_dist.optim.quantized_basis import load_basis
from gnlorp_dist.optim.refresh import refresh_due
from gnlorp_dist.optim.spec import group_params


class BackwardReduction:
    """The hooks of one optimizer (see the module docstring); built by
    :meth:`GradNormLoRPAdamW.reducing_in_backward`. ``optimizer``: where the states are read
    (its ``state``, which ``load_state_dict`` replaces); ``table``: its groups."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, table: ParamTable, comm: Communicator
    ) -> None:
        self.optimizer = optimizer
        self.table = table
        self.comm = comm
        self.low_rank: dict[Tensor, tuple[Tensor, list[Handle | None]]] = {}
        """Projected matrix -> its low-rank gradient (summed on its owner once waited for)."""
        self.dense: dict[Tensor, tuple[list[Tensor], list[Handle | None]]] = {}
        """Dense parameter -> the gradient rows this rank owns (summed once waited for)."""
        self.exchange = OwnerExchange(comm)
        """Where the hooks' reduces are bucketed; its last bucket launches as backward ends."""
        self._armed = False
        self._end_queued = False
        self._handles: list[RemovableHandle] = []
        for group in table.groups:
            for param in group_params(group):
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Start each parameter's reduction as its gradient is final in this backward pass."""
        self.drain()  # a previous armed pass whose step never came: its reductions are stale
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _hook(self, param: Tensor) -> None:
        if not self._armed or param.grad is None:
            return
        if not self._end_queued:
            # Launch the last, partly filled bucket when this backward pass ends (as DDP does).
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._end_queued = True
        comm = self.comm
        group_index, _name = self.table.find(param)
        projection = self.table.specs[group_index].projection
        blocks = self.table.ownership(comm.world_size)[param]
        handles: list[Handle | None] = []
        if projection is None:
            self.dense[param] = (reduce_to_owners(self.exchange, param, blocks, handles), handles)
            return
        state = self.optimizer.state.get(param)
        (block,) = blocks
        if projection.random and param.grad.dim() == 2:
            # Regenerated from the window's seed, as step() would: never stored, never due.
            step_count = int(state.get("step", 0)) if state else 0
            proj = regenerate_basis(
                projection,
                block.param_index,
                step_count,
                tuple(param.shape),
                dtype=torch.float32,
                device=buffer_device(comm, param.device),
            )
        elif (
            not state
            or "proj" not in state
            or refresh_due(projection, state)
            or param.grad.dim() != 2
        ):
            return  # step() refreshes it first (or refuses it)
        else:
            # Float32 when assembled from several ranks (bf16 weights too).
            proj = load_basis(state, torch.float32)
        side = projection.side(tuple(param.shape))
        # In the weights' dtype on the wire (bf16 weights: bf16, as DDP's buckets).
        grad = param.grad.reshape(projection.projected_shape(tuple(param.shape))).to(proj.dtype)
        low = project(grad, proj, side).to(param.dtype)
        low = low.to(buffer_device(comm, param.device)).contiguous()
        handles.append(self.exchange.reduce_sum(low, dst=block.owner))
        self.low_rank[param] = (low, handles)

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self.exchange.launch()

    def take_low_rank(self, param: Tensor) -> Tensor | None:
        """The reduced (summed, not yet averaged) low-rank gradient of ``param`` if a hook
        started it, after waiting for it; None otherwise."""
        entry = self.low_rank.pop(param, None)
        if entry is None:
            return None
        self.exchange.launch()  # launched at the end of backward already: a no-op then
        wait_all(entry[1])
        return entry[0]

    def take_dense(self, param: Tensor) -> list[Tensor] | None:
        """The summed gradient rows ``param``'s hook reduced to this rank, after waiting."""
        entry = self.dense.pop(param, None)
        if entry is None:
            return None
        self.exchange.launch()
        wait_all(entry[1])
        return entry[0]

    def drain(self) -> None:
        """Wait for and drop everything in flight (a skipped step; a stale pass)."""
        self.exchange.wait()
        for _low, handles in self.low_rank.values():
            wait_all(handles)
        for _rows, handles in self.dense.values():
            wait_all(handles)
        self.low_rank.clear()
        self.dense.clear()

    def remove(self) -> None:
        self.drain()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
