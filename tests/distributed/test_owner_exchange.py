"""The bucketed exchange onto and from owners (:mod:`gnlorp_dist.optim.owner_exchange`) against
the per-tensor reduce and broadcast it replaces, on 3 forked gloo ranks (one launch): sums in
rank order on the owner, owners' values everywhere, several buckets, several dtypes, rounds
when a segment is large, the tensor itself when it is alone, and one all-to-all per bucket."""

from __future__ import annotations

import pytest
import torch

from gnlorp_dist.optim import owner_exchange
from gnlorp_dist.optim.comm import LocalCommunicator
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from tests.distributed.harness import run_ranks

WORLD = 3
SHAPES = [(5, 7), (64,), (3, 3), (100, 2), (1,), (8, 8)]
OWNERS = [2, 0, 0, 1, 2, 2]


def _contribution(rank: int, index: int, shape: tuple[int, ...], dtype: torch.dtype):
    generator = torch.Generator().manual_seed(1000 * rank + index)
    return torch.randn(shape, generator=generator).to(dtype)


class _Counting:
    """The process group's communicator, counting its all-to-all launches."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.world_size, self.device = inner.rank, inner.world_size, inner.device
        self.all_to_all_calls = 0
        self.broadcast_calls = 0

    def all_to_all(self, output, input, output_splits, input_splits):
        self.all_to_all_calls += 1
        return self.inner.all_to_all(output, input, output_splits, input_splits)

    def broadcast(self, tensor, src):
        self.broadcast_calls += 1
        return self.inner.broadcast(tensor, src)


def _reduce_case(comm, dtype, bucket_bytes, receive_bytes):
    """Every tensor summed onto its owner through the exchange, and through plain reduces."""
    owner_exchange.MAX_RECEIVE_BYTES = receive_bytes
    exchange = OwnerExchange(comm, bucket_bytes=bucket_bytes)
    mine = [_contribution(comm.rank, i, s, dtype) for i, s in enumerate(SHAPES)]
    handles = [exchange.reduce_sum(t, dst=o) for t, o in zip(mine, OWNERS)]
    exchange.launch()
    for handle in handles:
        handle.wait()
    expected = []
    for i, shape in enumerate(SHAPES):
        total = _contribution(0, i, shape, dtype)
        for rank in range(1, comm.world_size):
            total = total + _contribution(rank, i, shape, dtype)  # rank order
        expected.append(total)
    return [(t, e) for t, e, o in zip(mine, expected, OWNERS) if o == comm.rank]


def _scenario(rank, world_size, out):
    from gnlorp_dist.distributed import ProcessGroupCommunicator  # noqa: PLC0415

    comm = _Counting(ProcessGroupCommunicator())
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for bucket_bytes, receive_bytes in ((1 << 20, 64 << 20), (64, 64), (1, 24)):
            pairs = _reduce_case(comm, dtype, bucket_bytes, receive_bytes)
            results["reduce", dtype, bucket_bytes] = all(torch.equal(t, e) for t, e in pairs)
    owner_exchange.MAX_RECEIVE_BYTES = 64 << 20
    # One bucket: one all-to-all for six tensors.
    before = comm.all_to_all_calls
    _reduce_case(comm, torch.float32, 1 << 20, 64 << 20)
    results["one_launch"] = comm.all_to_all_calls - before
    # Broadcasts: every rank ends with each owner's tensor.
    exchange = OwnerExchange(comm)
    tensors = [
        _contribution(o, i, s, torch.float32)
        if o == rank
        else torch.full(s, float("nan"), dtype=torch.float32)
        for i, (s, o) in enumerate(zip(SHAPES, OWNERS))
    ]
    before = comm.broadcast_calls
    for tensor, owner in zip(tensors, OWNERS):
        exchange.broadcast(tensor, src=owner)
    exchange.wait()
    results["broadcast"] = all(
        torch.equal(t, _contribution(o, i, s, torch.float32))
        for i, (t, s, o) in enumerate(zip(tensors, SHAPES, OWNERS))
    )
    results["broadcast_launches"] = comm.broadcast_calls - before
    # Alone in its bucket and contiguous: the tensor itself travels and takes the sum.
    alone = torch.full((1000,), float(rank + 1))
    exchange = OwnerExchange(comm, bucket_bytes=1)
    exchange.reduce_sum(alone, dst=1)
    exchange.wait()
    results["alone"] = alone[0].item()
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("exchange")
    run_ranks(WORLD, _scenario, out)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bucket_bytes", [1 << 20, 64, 1])
def test_sums_on_owners_equal_rank_ordered_sums(results, dtype, bucket_bytes):
    # 1 MiB: one bucket; 64 B: several; 1 B with 24-byte receive rounds: a bucket per tensor,
    # the larger ones in several all-to-all rounds.
    assert all(r["reduce", dtype, bucket_bytes] for r in results)


def test_one_all_to_all_per_bucket(results):
    assert all(r["one_launch"] == 1 for r in results)


def test_broadcasts_give_every_rank_the_owners_values(results):
    assert all(r["broadcast"] for r in results)
    # One broadcast per owner with tensors in the bucket, not one per tensor.
    assert all(r["broadcast_launches"] == len(set(OWNERS)) for r in results)


def test_a_tensor_alone_takes_its_sum_in_place(results):
    assert results[1]["alone"] == 1.0 + 2.0 + 3.0  # the owner
    assert results[0]["alone"] == 1.0 and results[2]["alone"] == 3.0  # untouched elsewhere


def test_one_process_exchanges_nothing():
    exchange = OwnerExchange(LocalCommunicator())
    tensor = torch.ones(4)
    assert exchange.reduce_sum(tensor, dst=0) is None
    assert exchange.broadcast(tensor, src=0) is None
    exchange.wait()
    assert torch.equal(tensor, torch.ones(4))


def test_waiting_before_launch_is_an_internal_error():
    class TwoRanks(LocalCommunicator):
        world_size = 2

    exchange = OwnerExchange(TwoRanks())
    handle = exchange.reduce_sum(torch.ones(4), dst=1)
    with pytest.raises(AssertionError, match="before it was launched"):
        handle.wait()
