"""Sums onto owners and sends from owners, coalesced into buckets of about 25 MiB.

Each projected matrix and each dense row block has one owner (:mod:`gnlorp_dist.optim.ownership`).
Reducing each onto its owner with its own ``reduce`` and sending its result back with its own
``broadcast`` costs a launch per tensor, and gloo's ``reduce`` moves 2.25x a ring's bytes at 2
ranks and 1.42x at 4 (benchmarks/README.md, the calibration below the bytes table). An
:class:`OwnerExchange` packs the tensors one phase sends into buckets instead (per kind and
dtype, in call order, closed at :data:`BUCKET_BYTES`; a tensor that large alone is its own
bucket and travels without a copy where it can), each bucket ordered by owner, so that it is
``world_size`` segments, segment ``r`` the tensors rank ``r`` owns:

- **reduce** (:meth:`OwnerExchange.reduce_sum`): ONE all-to-all per bucket. Rank ``r`` receives
  every rank's copy of segment ``r`` and adds them in rank order. Each rank sends the segments it
  does not own, ``(N-1)/N`` of the bucket when ownership is balanced: a ring reduce-scatter's
  bytes, on gloo (whose own reduce-scatter is an all-reduce: 2x at 2 ranks) and on NCCL alike.
  The receive buffer is ``N`` times the segment; a segment that would make it pass
  :data:`MAX_RECEIVE_BYTES` goes in several rounds.
- **broadcast** (:meth:`OwnerExchange.broadcast`): each owner's segment broadcast from it, ``N``
  launches per bucket instead of one per tensor (gloo's and NCCL's broadcasts move a ring's
  bytes: calibration above).

Every rank must call in the same order with the same shapes and owners, as for the collectives
these replace, and launch at the same points (a full bucket, or :meth:`OwnerExchange.launch`
before waiting): the buckets are then the same on every rank. A handle's ``wait`` needs its
bucket launched (an internal invariant). Buffers live on the communicator's device
(:func:`~gnlorp_dist.optim.comm.buffer_device`); nothing here reads the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import Communicator, Handle, buffer_device, wait_all

BUCKET_BYTES = 25 << 20
"""A bucket is launched once its tensors reach this many bytes (DDP's default bucket size)."""

MAX_RECEIVE_BYTES = 64 << 20
"""The largest receive buffer of one all-to-all round (``world_size`` times a segment's round)."""


class _Bucket:
    """Tensors of one kind and dtype, with their owners, that travel together."""

    def __init__(self, comm: Communicator, reduce: bool, dtype: torch.dtype) -> None:
        self.comm = comm
        self.reduce = reduce
        self.dtype = dtype
        self.members: list[tuple[Tensor, int]] = []
        self.nbytes = 0
        self.flat: Tensor | None = None
        self.offsets: list[int] = []
        self.handles: list[Handle | None] = []
        self.rounds: list[tuple[Tensor, int, int]] = []
        self.own = (0, 0)
        """This rank's segment of the bucket: ``(start, numel)``."""
        self.launched = False
        self.finished = False

    def add(self, tensor: Tensor, owner: int) -> None:
        assert not self.launched
        assert 0 <= owner < self.comm.world_size, owner
        self.members.append((tensor, owner))
        self.nbytes += tensor.numel() * tensor.element_size()

    def launch(self) -> None:
        """Pack by owner and start the bucket's collectives."""
        assert not self.launched
        self.launched = True
        world, rank = self.comm.world_size, self.comm.rank
        splits = [0] * world
        for tensor, owner in self.members:
            splits[owner] += tensor.numel()
        starts = [sum(splits[:r]) for r in range(world)]
        filled = list(starts)
        self.offsets = []
        for tensor, owner in self.members:
            self.offsets.append(filled[owner])
            filled[owner] += tensor.numel()
        self.flat = self._packed(starts)
        if self.reduce:
            self._start_reduce(starts, splits)
        else:
            for owner in range(world):
                if splits[owner]:
                    segment = self.flat[starts[owner] : starts[owner] + splits[owner]]
                    self.handles.append(self.comm.broadcast(segment, src=owner))
        self.own = (starts[rank], splits[rank])

    def _packed(self, starts: list[int]) -> Tensor:
        """The bucket as one flat buffer: the tensor itself when it is alone and contiguous on
        the collective's device (no copy), else a packed copy (a broadcast packs only what this
        rank owns: the rest is received)."""
        (first, _owner), *rest = self.members
        device = buffer_device(self.comm, first.device)
        if not rest and first.is_contiguous() and first.device == device:
            return first.view(-1)
        total = sum(tensor.numel() for tensor, _owner in self.members)
        flat = torch.empty(total, dtype=self.dtype, device=device)
        for (tensor, owner), offset in zip(self.members, self.offsets):
            if self.reduce or owner == self.comm.rank:
                flat[offset : offset + tensor.numel()].view_as(tensor).copy_(tensor)
        return flat

    def _start_reduce(self, starts: list[int], splits: list[int]) -> None:
        """All-to-all rounds: round ``k`` carries elements ``[k c, (k+1) c)`` of every segment,
        ``c`` chosen so a round's receive buffer stays under :data:`MAX_RECEIVE_BYTES`."""
        assert self.flat is not None
        world, rank = self.comm.world_size, self.comm.rank
        itemsize = self.flat.element_size()
        chunk = max(1, MAX_RECEIVE_BYTES // (world * itemsize))
        for k in range(max(1, math.ceil(max(splits) / chunk))):
            pieces = [min(chunk, max(0, splits[r] - k * chunk)) for r in range(world)]
            if k == 0 and max(splits) <= chunk:
                send = self.flat
            else:
                parts = [
                    self.flat[starts[r] + k * chunk : starts[r] + k * chunk + pieces[r]]
                    for r in range(world)
                ]
                send = torch.cat(parts)
            received = torch.empty(world * pieces[rank], dtype=self.dtype, device=send.device)
            self.handles.append(
                self.comm.all_to_all(received, send, [pieces[rank]] * world, pieces)
            )
            self.rounds.append((received, k * chunk, pieces[rank]))

    def finish(self) -> None:
        """Wait, then give each member its result: its sum on its owner (reduce), its owner's
        values elsewhere (broadcast)."""
        assert self.launched, "an owner exchange was waited for before it was launched"
        if self.finished:
            return
        self.finished = True
        wait_all(self.handles)
        assert self.flat is not None
        rank = self.comm.rank
        if self.reduce:
            start, _numel = self.own
            for received, offset, count in self.rounds:
                by_rank = received.view(self.comm.world_size, count)
                total = self.flat[start + offset : start + offset + count]
                total.copy_(by_rank[0])
                for row in by_rank[1:]:  # rank order: the same sum wherever it is formed
                    total.add_(row)
        for (tensor, owner), offset in zip(self.members, self.offsets):
            if (owner == rank) != self.reduce:
                continue  # a reduce's sum is the owner's; a broadcast's owner had it already
            source = self.flat[offset : offset + tensor.numel()]
            if source.data_ptr() != tensor.data_ptr():
                tensor.copy_(source.view_as(tensor))
        self.flat, self.rounds, self.members, self.handles = None, [], [], []


class _MemberHandle:
    """One tensor's share of a bucket: waiting finishes the whole bucket."""

    def __init__(self, bucket: _Bucket) -> None:
        self.bucket = bucket

    def wait(self) -> None:
        self.bucket.finish()


class OwnerExchange:
    """One phase's reduces onto owners and broadcasts from owners, bucketed (see the module
    docstring). ``reduce_sum`` and ``broadcast`` behave as the communicator's methods of the same
    names (in place, asynchronous, the tensor untouched until waited for), with one more rule:
    call :meth:`launch` on every rank before waiting for any of their handles."""

    def __init__(self, comm: Communicator, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.comm = comm
        self.bucket_bytes = bucket_bytes
        self._open: dict[tuple[bool, torch.dtype], _Bucket] = {}
        self._started: list[_Bucket] = []

    def reduce_sum(self, tensor: Tensor, dst: int) -> Handle | None:
        """Sum ``tensor`` over every rank into rank ``dst``'s copy."""
        return self._add(tensor, dst, reduce=True)

    def broadcast(self, tensor: Tensor, src: int) -> Handle | None:
        """Give every rank rank ``src``'s ``tensor``."""
        return self._add(tensor, src, reduce=False)

    def _add(self, tensor: Tensor, owner: int, reduce: bool) -> Handle | None:
        if self.comm.world_size == 1 or tensor.numel() == 0:
            return None  # nothing travels
        key = (reduce, tensor.dtype)
        bucket = self._open.get(key)
        if bucket is None:
            bucket = self._open[key] = _Bucket(self.comm, reduce, tensor.dtype)
            self._started.append(bucket)
        bucket.add(tensor, owner)
        if bucket.nbytes >= self.bucket_bytes:
            del self._open[key]
            bucket.launch()
        return _MemberHandle(bucket)

    def launch(self) -> None:
        """Start every bucket still open (in the order they were opened: the same on every
        rank)."""
        buckets, self._open = list(self._open.values()), {}
        for bucket in buckets:
            bucket.launch()

    def wait(self) -> None:
        """:meth:`launch`, then wait for every bucket of this exchange and hand out the
        results."""
        self.launch()
        started, self._started = self._started, []
        for bucket in started:
            bucket.finish()
