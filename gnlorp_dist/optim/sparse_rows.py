"""Reducing only the rows of a row-sparse gradient that some rank touched (exact).

An embedding's gradient is nonzero only in the rows of the tokens in the batch: the other rows are
exactly zero on every rank, so their sum is zero and need not travel. For a table-shaped dense
matrix (:func:`table_shaped`) reduced to its owners (:func:`~gnlorp_dist.optim.data_parallel.
reduce_to_owners`), each rank marks the rows of its gradient that hold any nonzero entry
(:func:`touched_rows`; a NaN or an infinity counts as touched, so the non-finite check still
sees it), ONE all-reduce of that mask (one byte per row) gives the union on every rank, and if
few enough rows are touched (:func:`sparse_rows_pay`, decided from the agreed union, so every
rank decides alike) each ownership block's touched rows are gathered into a contiguous buffer,
summed onto the block's owner (through the phase's
:class:`~gnlorp_dist.optim.owner_exchange.OwnerExchange`) and scattered back into its gradient there. Untouched rows stay
exactly zero; touched rows get the same sum as the full reduce (bitwise at 2 ranks; at more,
the backend may add the ranks in another order for a buffer of another length, a last-bit
difference).

Which tensors are checked is detected from the gradient, never from names: a 2-D floating
gradient with at least :data:`TABLE_ROWS_PER_COLUMN` rows per column (a lookup table: vocab x
hidden; a layer's weight is never that tall, so its steps pay no mask and no host read). A
table whose agreed union is too large (``lm_head``: every row gets a gradient) is remembered as
dense (:func:`found_dense`, the same on every rank since it is decided from the agreed union)
and reduced in full from then on, so it pays the mask once.

Buffers follow the gradient's device (as the full reduce hands the gradient itself to the
collective). Host sync: sizing the gathered buffers needs the touched-row count of each block on
the host, ONE read (``tolist`` of a ``world_size``-element tensor) per checked table per
reduction: on a GPU the host waits there for the gradient and the mask's all-reduce. Under the
backward-pass reduction the input embedding's hook fires last in backward, where little is left
to overlap (listed in docs/gpu.md, "Host syncs on the hot path").
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import Communicator, Handle
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.ownership import OwnedBlock

TABLE_ROWS_PER_COLUMN = 4
"""A 2-D gradient with at least this many rows per column is a lookup table's (Llama's
embedding: 32000 x 4096, 7.8; the 45M benchmark's: 32000 x 512, 62), checked for sparse rows."""

MAX_TOUCHED_FRACTION = 0.9
"""The sparse reduce runs only when at most this fraction of the rows is touched (above it, the
bytes saved no longer pay for the gather, the scatter and the host read)."""

_FOUND_DENSE: dict[int, weakref.ref[Tensor]] = {}
"""id -> the parameter whose agreed union of touched rows was once too large (keyed by identity:
tensors compare element-wise)."""


def table_shaped(shape: tuple[int, ...]) -> bool:
    """Whether a gradient of ``shape`` is checked for sparse rows (see the module docstring)."""
    return len(shape) == 2 and shape[1] > 0 and shape[0] >= TABLE_ROWS_PER_COLUMN * shape[1]


def found_dense(param: Tensor) -> bool:
    """Whether ``param``'s gradient was once found with too many touched rows."""
    ref = _FOUND_DENSE.get(id(param))
    return ref is not None and ref() is param


def _remember_dense(param: Tensor) -> None:
    key = id(param)
    _FOUND_DENSE[key] = weakref.ref(param, lambda _ref: _FOUND_DENSE.pop(key, None))


def touched_rows(grad: Tensor) -> Tensor:
    """A boolean mask of ``grad``'s rows that hold any nonzero (or non-finite) entry."""
    assert grad.dim() == 2, tuple(grad.shape)
    return grad.ne(0).any(dim=1)


def mask_dtype(world_size: int) -> torch.dtype:
    """The dtype of the summed row mask: a byte a row while the sum cannot overflow it."""
    return torch.uint8 if world_size <= 255 else torch.int32


def sparse_rows_pay(touched: int, rows: int, row_bytes: int, mask_bytes: int) -> bool:
    """Whether reducing ``touched`` of ``rows`` rows (``row_bytes`` each) moves fewer bytes than
    the full reduce, the mask's ``mask_bytes`` included, and touches at most
    :data:`MAX_TOUCHED_FRACTION` of the rows."""
    assert 0 <= touched <= rows, (touched, rows)
    fewer_bytes = mask_bytes + touched * row_bytes < rows * row_bytes
    return fewer_bytes and touched <= MAX_TOUCHED_FRACTION * rows


def block_row_indices(union: Tensor, start: int, stop: int, count: int) -> Tensor:
    """The indices (into the whole tensor, ascending) of the ``count`` touched rows of
    ``union[start:stop]``; ``count`` is known, so no host sync."""
    local = torch.nonzero_static(union[start:stop], size=count).reshape(-1)
    return local + start


class ScatteredRows:
    """The handle of a gathered rows' reduce: :meth:`wait` waits for it and, on the owner, copies
    the summed rows back into the gradient (before the caller averages the owned rows)."""

    def __init__(
        self, handle: Handle | None, grad: Tensor, indices: Tensor, rows: Tensor | None
    ) -> None:
        self.handle = handle
        self.grad = grad
        self.indices = indices
        self.rows = rows
        """The summed rows once waited for; None on a rank that does not own them."""

    def wait(self) -> None:
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        if self.rows is not None:
            self.grad.index_copy_(0, self.indices, self.rows)
            self.rows = None


def agreed_union(comm: Communicator, grad: Tensor) -> Tensor:
    """The rows some rank's ``grad`` touched (a boolean mask, on the gradient's device): one
    all-reduce of the ranks' masks, waited for."""
    mask = touched_rows(grad).to(mask_dtype(comm.world_size))
    handle = comm.all_reduce_sum(mask)
    if handle is not None:
        handle.wait()
    return mask.ne(0)


def reduce_touched_rows_to_owners(
    exchange: OwnerExchange,
    tensor: Tensor,
    blocks: list[OwnedBlock],
    handles: list[Handle | None],
) -> list[Tensor] | None:
    """:func:`~gnlorp_dist.optim.data_parallel.reduce_to_owners` for a table-shaped gradient whose
    touched rows are few: start each block's reduce of its touched rows and return the blocks
    this rank owns (summed once ``exchange`` and ``handles`` are waited for). None where it does not apply (the
    caller reduces the whole gradient): every rank returns None together."""
    grad = tensor.grad
    assert grad is not None
    comm = exchange.comm
    if comm.world_size == 1 or not grad.dtype.is_floating_point:
        return None
    if not table_shaped(tuple(grad.shape)) or found_dense(tensor):
        return None
    union = agreed_union(comm, grad)
    counts = torch.stack([union[b.row_start : b.row_stop].sum() for b in blocks])
    per_block = counts.tolist()  # THE host read (see the module docstring)
    rows, cols = grad.shape
    mask_bytes = rows * mask_dtype(comm.world_size).itemsize
    if not sparse_rows_pay(sum(per_block), rows, cols * grad.element_size(), mask_bytes):
        _remember_dense(tensor)
        return None
    owned = []
    for block, count in zip(blocks, per_block):
        mine = block.owner == comm.rank
        if mine:
            owned.append(grad if block.whole else grad[block.row_start : block.row_stop])
        if count == 0:
            continue  # zero on every rank: nothing to sum
        indices = block_row_indices(union, block.row_start, block.row_stop, count)
        gathered = grad.index_select(0, indices)
        handle = exchange.reduce_sum(gathered, dst=block.owner)
        handles.append(ScatteredRows(handle, grad, indices, gathered if mine else None))
    return owned
