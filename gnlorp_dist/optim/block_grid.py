"""Agreeing the scales of 8-bit blocks cut between ranks (one collective per group step).

Every 8-bit moment sits on its whole tensor's block grid (:mod:`gnlorp_dist.optim.quantized`).
Where a layout cuts a tensor inside a block (a DDP row block, a ZeRO partition, an FSDP2 shard),
two ranks hold parts of that block; each computes the absmax of its part, and the block's scale
is the larger one, exactly what one process computes over the whole block. A run has at most
two such blocks (its first and last), so the agreement is one small all-reduce per group step:
a float64 vector with, for every sharded 8-bit tensor of the group, every rank and both ends,
``(block + 1, absmax of exp_avg, absmax of exp_avg_sq)``, each slot written by one rank (a sum
is then a gather). Float64 holds block indices exactly up to 2^53.
"""

from __future__ import annotations

import torch

from gnlorp_dist.optim.comm import Communicator
from gnlorp_dist.optim.quantized import MOMENT_KEYS, SharedBlock, settle_shared

SLOT = 1 + len(MOMENT_KEYS)


def agree_shared_blocks(
    comm: Communicator, device: torch.device, shared: list[list[SharedBlock]]
) -> None:
    """Agree and write the scales of every tensor's ``shared`` blocks (``shared[j]``: this
    rank's blocks of the j-th sharded 8-bit tensor of the group, at most two; the list has the
    same length on every rank, which all call this together)."""
    if not shared:
        return
    world = comm.world_size
    table = torch.zeros(len(shared), world, 2, SLOT, dtype=torch.float64, device=device)
    for j, blocks in enumerate(shared):
        assert len(blocks) <= 2, [b.block for b in blocks]
        for end, item in enumerate(blocks):
            table[j, comm.rank, end, 0] = item.block + 1
            for k, key in enumerate(MOMENT_KEYS):
                table[j, comm.rank, end, 1 + k] = item.absmax[key]
    handle = comm.all_reduce_sum(table)
    if handle is not None:
        handle.wait()
    rows = table.view(len(shared), world * 2, SLOT)
    for j, blocks in enumerate(shared):
        agreed = {}
        for item in blocks:
            # A mask, not boolean indexing: no host sync (absmaxes are >= 0).
            holds = rows[j, :, 0] == item.block + 1
            for k, key in enumerate(MOMENT_KEYS):
                agreed[(item.block, key)] = torch.where(holds, rows[j, :, 1 + k], 0.0).max().float()
        settle_shared(blocks, agreed)
