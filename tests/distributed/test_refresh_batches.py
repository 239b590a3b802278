"""A refresh assembles whole gradients in batches capped by bytes, with unbatched results.

Under the low-rank reduction (as under ZeRO and FSDP2) a refresh sums each due matrix's whole
gradient onto its owner; at step 0 every matrix is due. One 2-rank launch trains the tiny LLaMA
with the cap off, at 16 KiB (batches of a few matrices) and at 1 byte (each matrix alone), in
fp32 and bf16, counting the bytes of the assembly buffers alive at once: every buffer comes from
``refresh.new_buffer``, replaced here by one that tracks its tensors by weak reference (a
tensor still held by a collective's handle stays alive) and counts the bytes of their storage
(a released buffer holds none); the peak is taken at each allocation, the only moments the
live total grows.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.distributed import ProcessGroupCommunicator, broadcast_parameters
from gnlorp_dist.optim import refresh
from gnlorp_dist.optim.refresh import assembly_bytes, cut_batches

from ..unit.test_groups import tiny_llama
from .harness import flat_parameters, run_ranks, train_on_global_batches

STEPS, GAP = 7, 3  # refreshes at steps 0, 3 and 6
CAPS = (None, 16 * 2**10, 1)
NUM_PROJECTED = 14
LARGEST_NUMEL = 88 * 32  # gate/up/down projections of the tiny LLaMA
TOTAL_NUMEL = 2 * (4 * 32 * 32 + 3 * 88 * 32)


class LiveBuffers:
    """``refresh.new_buffer`` that records the peak bytes of its buffers alive at once."""

    def __init__(self) -> None:
        self.live: list[weakref.ref] = []
        self.peak = 0
        self.allocated = 0

    def __call__(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = torch.zeros(numel, dtype=dtype, device=device)
        self.live = [ref for ref in self.live if ref() is not None]
        self.live.append(weakref.ref(tensor))
        alive = [t for ref in self.live if (t := ref()) is not None]
        self.peak = max(self.peak, sum(t.untyped_storage().nbytes() for t in alive))
        self.allocated += 1
        return tensor


def _global_batch(step):
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(300 + step))


def _train(rank, world_size, comm, cap, dtype):
    model = apply_weight_norm(tiny_llama(seed=5)).to(dtype)
    broadcast_parameters(model, comm)
    groups = projected_param_groups(model, rank=6, update_proj_gap=GAP, scale=0.25)
    optimizer = GradNormLoRPAdamW(groups, lr=1e-2, communicator=comm, gradient_reduction="low_rank")
    tracker = LiveBuffers()
    saved = refresh.new_buffer, refresh.REFRESH_BATCH_BYTES
    refresh.new_buffer, refresh.REFRESH_BATCH_BYTES = tracker, cap
    try:
        train_on_global_batches(model, optimizer, range(STEPS), _global_batch, rank, world_size)
    finally:
        refresh.new_buffer, refresh.REFRESH_BATCH_BYTES = saved
    bases = [optimizer.state[p]["proj"].clone() for p in groups[0]["params"]]
    return {
        "weights": flat_parameters(model),
        "bases": bases,
        "peak": tracker.peak,
        "allocated": tracker.allocated,
        "refreshes": optimizer.refresh_count,
    }


def _scenarios(rank, world_size, out):
    comm = ProcessGroupCommunicator()
    result = {
        (str(dtype), cap): _train(rank, world_size, comm, cap, dtype)
        for dtype in (torch.float32, torch.bfloat16)
        for cap in CAPS
    }
    torch.save(result, Path(out) / f"rank-{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("refresh-batches")
    run_ranks(2, _scenarios, str(out))
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(2)]


def test_cut_batches_keeps_the_order_and_puts_an_oversized_matrix_alone():
    assert cut_batches([4, 4, 4, 10, 2, 2], 8) == [[0, 1], [2], [3], [4, 5]]
    assert cut_batches([4, 4, 4], None) == [[0, 1, 2]]
    assert cut_batches([4, 4, 4], 0) == [[0, 1, 2]]
    assert cut_batches([], 8) == []
    assert assembly_bytes(10, torch.float32) == 40
    assert assembly_bytes(10, torch.bfloat16) == 20 + 40  # the wire buffer and its fp32 copy


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_batched_refreshes_give_bitwise_the_unbatched_weights_and_bases(results, dtype):
    for per_rank in results:
        unbatched = per_rank[(dtype, None)]
        assert unbatched["refreshes"] > 0
        for cap in CAPS[1:]:
            batched = per_rank[(dtype, cap)]
            assert torch.equal(batched["weights"], unbatched["weights"]), cap
            assert all(torch.equal(a, b) for a, b in zip(batched["bases"], unbatched["bases"]))
            assert batched["refreshes"] == unbatched["refreshes"]
    assert torch.equal(
        results[0][(dtype, CAPS[1])]["weights"], results[1][(dtype, CAPS[1])]["weights"]
    )


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_full_buffers_alive_at_once_stay_under_the_cap(results, dtype):
    wire = torch.float32 if dtype == "torch.float32" else torch.bfloat16
    largest = assembly_bytes(LARGEST_NUMEL, wire)
    for per_rank in results:
        for cap in CAPS:
            run = per_rank[(dtype, cap)]
            assert run["allocated"] >= 3 * NUM_PROJECTED  # every due matrix, 3 refreshes
        # Off: the whole model's projected gradients at once (on the owner's side of a matrix
        # the fp32 copy joins the wire buffer), which the cap is there to prevent.
        assert per_rank[(dtype, None)]["peak"] >= TOTAL_NUMEL * wire.itemsize
        assert per_rank[(dtype, None)]["peak"] > CAPS[1]
        # A matrix larger than the cap (bf16: wire buffer and fp32 copy) is assembled alone.
        assert per_rank[(dtype, CAPS[1])]["peak"] <= max(CAPS[1], largest)
        assert per_rank[(dtype, 1)]["peak"] <= largest  # one matrix at a time
    # The count sees a whole matrix on its owner (each rank owns some of the largest).
    assert min(per_rank[(dtype, 1)]["peak"] for per_rank in results) == largest
