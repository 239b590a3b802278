"""The row-gathering math of the sparse-row reduce (:mod:`gnlorp_dist.optim.sparse_rows`).

The collectives are simulated here: the ranks' gathered rows are summed by hand and scattered
back, which must give the dense sum of the ranks' gradients bitwise.
"""

from __future__ import annotations

import gc

import pytest
import torch

from gnlorp_dist.optim import sparse_rows
from gnlorp_dist.optim.comm import LocalCommunicator
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.sparse_rows import (
    ScatteredRows,
    block_row_indices,
    found_dense,
    mask_dtype,
    reduce_touched_rows_to_owners,
    sparse_rows_pay,
    table_shaped,
    touched_rows,
)


def _row_sparse(rows: int, cols: int, touched: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    grad = torch.zeros(rows, cols)
    grad[touched] = torch.randn(len(touched), cols, generator=gen)
    return grad


def test_touched_rows_marks_any_nonzero_or_non_finite_entry():
    grad = torch.zeros(6, 3)
    grad[1, 2] = 1e-30
    grad[3, 0] = float("nan")
    grad[4, 1] = float("-inf")
    grad[5] = -0.0  # a negative zero is zero: nothing to sum
    assert touched_rows(grad).tolist() == [False, True, False, True, True, False]


def test_table_shaped_is_a_lookup_tables_shape():
    assert table_shaped((32000, 512)) and table_shaped((32000, 4096))
    assert table_shaped((64, 16))  # 4 rows per column: the boundary
    assert not table_shaped((63, 16))
    assert not table_shaped((11008, 4096))  # a layer's weight
    assert not table_shaped((512, 512))
    assert not table_shaped((32000,)) and not table_shaped((4, 0))


def test_mask_dtype_holds_the_rank_count():
    assert mask_dtype(2) == torch.uint8 and mask_dtype(255) == torch.uint8
    assert mask_dtype(256) == torch.int32


@pytest.mark.parametrize(
    ("touched", "pays"),
    [(0, True), (900, True), (901, False), (1000, False)],
)
def test_sparse_rows_pay_at_most_the_fraction_of_the_rows(touched, pays):
    assert sparse_rows_pay(touched, 1000, row_bytes=2048, mask_bytes=1000) is pays


def test_sparse_rows_never_pay_more_bytes_than_the_full_reduce():
    # One-column rows: the mask costs as much as the rows it would save.
    assert not sparse_rows_pay(1, 1000, row_bytes=1, mask_bytes=1000)
    assert sparse_rows_pay(1, 1000, row_bytes=4, mask_bytes=1000)


def test_block_row_indices_are_the_blocks_touched_rows_in_whole_tensor_indices():
    union = torch.zeros(10, dtype=torch.bool)
    union[[0, 3, 4, 7, 9]] = True
    assert block_row_indices(union, 0, 5, 3).tolist() == [0, 3, 4]
    assert block_row_indices(union, 5, 10, 2).tolist() == [7, 9]
    assert block_row_indices(union, 5, 7, 0).tolist() == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_gathered_sums_scattered_back_equal_the_dense_sum(world_size):
    """Each rank touches its own rows (some shared, some blocks untouched); the touched rows of
    each block, gathered, summed and scattered into the owner's gradient, give the dense sum."""
    rows, cols = 40, 5
    touched = [[0, 3, 17, 18], [3, 4, 18, 19], [1, 17]][:world_size]
    grads = [_row_sparse(rows, cols, t, seed=r) for r, t in enumerate(touched)]
    blocks = [(0, 10), (10, 20), (20, 40)]  # the last block holds no touched row
    union = torch.stack([touched_rows(g) for g in grads]).to(torch.uint8).sum(0).ne(0)
    dense_sum = sum(grads[1:], grads[0].clone())
    for owner, (start, stop) in enumerate(blocks):
        count = int(union[start:stop].sum())
        indices = block_row_indices(union, start, stop, count)
        summed = sum(g.index_select(0, indices) for g in grads)
        grad = grads[owner % world_size].clone()
        ScatteredRows(None, grad, indices, summed).wait()
        assert torch.equal(grad[start:stop], dense_sum[start:stop]), (start, stop)


def test_a_rank_that_does_not_own_the_rows_keeps_its_gradient():
    grad = _row_sparse(8, 2, [1, 5], seed=0)
    before = grad.clone()
    ScatteredRows(None, grad, torch.tensor([1, 5]), None).wait()
    assert torch.equal(grad, before)


def test_one_process_reduces_nothing_here():
    param = torch.nn.Parameter(torch.zeros(64, 4))
    param.grad = _row_sparse(64, 4, [2], seed=0)
    block = OwnedBlock(param_index=0, owner=0, row_start=0, row_stop=64, whole=True)
    handles: list = []
    assert (
        reduce_touched_rows_to_owners(OwnerExchange(LocalCommunicator()), param, [block], handles)
        is None
    )
    assert handles == []


def test_a_table_found_dense_is_remembered_by_identity_while_it_lives():
    param = torch.nn.Parameter(torch.zeros(64, 4))
    other = torch.nn.Parameter(torch.zeros(64, 4))
    sparse_rows._remember_dense(param)
    assert found_dense(param) and not found_dense(other)
    key = id(param)
    del param
    gc.collect()
    assert key not in sparse_rows._FOUND_DENSE
