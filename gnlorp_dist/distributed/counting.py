"""Counting the bytes a process hands to ``torch.distributed``: the measuring tools of the
communication benchmark (:mod:`gnlorp_dist.bench.communication`), here because only this package
imports ``torch.distributed`` (its forked ranks meet through
:mod:`gnlorp_dist.distributed.rendezvous`).

Three counters see the same collectives from three places (the benchmark checks they agree):

- :class:`DistCounter`: every call of ``torch.distributed``'s collective functions in this
  process (DeepSpeed's ``deepspeed.comm`` calls them too);
- :func:`counted_ddp`: DDP's gradient buckets, through a comm hook (DDP's default all-reduce
  behind a counter);
- :class:`CountingCommunicator`: the optimizer's collectives, through its communicator.

Payload conventions (:data:`PAYLOAD_OF_CALL`): all-reduce, reduce, broadcast: the tensor;
all-gather: the gathered output; reduce-scatter and all-to-all: the input.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist.distributed.communicator import ProcessGroupCommunicator

COLLECTIVE_KINDS: tuple[str, ...] = (
    "all_reduce",
    "reduce",
    "broadcast",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
)
"""Collective kinds, as counted and as the benchmark's cost model knows them."""


def tensor_bytes(tensor: Any) -> int:
    """Bytes of ``tensor``'s elements; 0 for anything that is not a tensor."""
    return tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _listed_bytes(args: tuple, kwargs: dict, index: int, name: str) -> int:
    return sum(tensor_bytes(t) for t in _arg(args, kwargs, index, name) or [])


PAYLOAD_OF_CALL: dict[str, tuple[str, Callable[[tuple, dict], int]]] = {
    "all_reduce": ("all_reduce", lambda a, k: tensor_bytes(_arg(a, k, 0, "tensor"))),
    "reduce": ("reduce", lambda a, k: tensor_bytes(_arg(a, k, 0, "tensor"))),
    "broadcast": ("broadcast", lambda a, k: tensor_bytes(_arg(a, k, 0, "tensor"))),
    "all_gather": ("all_gather", lambda a, k: _listed_bytes(a, k, 0, "tensor_list")),
    "all_gather_into_tensor": (
        "all_gather",
        lambda a, k: tensor_bytes(_arg(a, k, 0, "output_tensor")),
    ),
    "_all_gather_base": ("all_gather", lambda a, k: tensor_bytes(_arg(a, k, 0, "output_tensor"))),
    "reduce_scatter": ("reduce_scatter", lambda a, k: _listed_bytes(a, k, 1, "input_list")),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, k: tensor_bytes(_arg(a, k, 1, "input"))),
    "_reduce_scatter_base": ("reduce_scatter", lambda a, k: tensor_bytes(_arg(a, k, 1, "input"))),
    "all_reduce_coalesced": ("all_reduce", lambda a, k: _listed_bytes(a, k, 0, "tensors")),
    "all_to_all_single": ("all_to_all", lambda a, k: tensor_bytes(_arg(a, k, 1, "input"))),
}
"""``torch.distributed`` function -> (its kind, the payload of one call from its arguments)."""


def _by_kind(counts: dict[str, int]) -> dict[str, int]:
    return {kind: counts.get(kind, 0) for kind in COLLECTIVE_KINDS}


class DistCounter:
    """Payload bytes handed to ``torch.distributed``'s collectives in this process, by kind.

    :meth:`install` replaces the functions in ``torch.distributed`` and ``distributed_c10d``
    with counting wrappers. It must run before DeepSpeed's communication backend is created
    (``deepspeed.init_distributed``), which keeps references to some of them.
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def install(self) -> DistCounter:
        c10d = dist.distributed_c10d
        for fname, (kind, size) in PAYLOAD_OF_CALL.items():
            original = getattr(c10d, fname, None)
            if original is None:
                continue
            wrapper = self._wrap(original, kind, size)
            setattr(c10d, fname, wrapper)
            if getattr(dist, fname, None) is original:
                setattr(dist, fname, wrapper)
        return self

    def _wrap(self, original: Callable, kind: str, size: Callable[[tuple, dict], int]) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.bytes[kind] += size(args, kwargs)
            self.calls[kind] += 1
            return original(*args, **kwargs)

        counted.__wrapped__ = original  # type: ignore[attr-defined]
        return counted

    def snapshot(self) -> dict[str, int]:
        return _by_kind(self.bytes)


class CountingCommunicator(ProcessGroupCommunicator):
    """A :class:`ProcessGroupCommunicator` that counts the payload of each collective it starts
    (a subclass, not a wrapper: the optimizer may look at its type or other attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)

    def broadcast(self, tensor: torch.Tensor, src: int) -> dist.Work | None:
        self.bytes["broadcast"] += tensor_bytes(tensor)
        return super().broadcast(tensor, src)

    def all_reduce_sum(self, tensor: torch.Tensor) -> dist.Work | None:
        self.bytes["all_reduce"] += tensor_bytes(tensor)
        return super().all_reduce_sum(tensor)

    def reduce_sum(self, tensor: torch.Tensor, dst: int) -> dist.Work | None:
        self.bytes["reduce"] += tensor_bytes(tensor)
        return super().reduce_sum(tensor, dst)

    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
    ) -> dist.Work | None:
        self.bytes["all_to_all"] += tensor_bytes(input)
        return super().all_to_all(output, input, output_splits, input_splits)

    def snapshot(self) -> dict[str, int]:
        return _by_kind(self.bytes)


def counting_ddp_hook(state: dict[str, int], bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP's default all-reduce of a bucket, its bytes (``state["all_reduce"]``) and the bucket
    (``state["buckets"]``) counted first."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: PLC0415

    buffer = bucket.buffer()
    state["all_reduce"] = state.get("all_reduce", 0) + tensor_bytes(buffer)
    state["buckets"] = state.get("buckets", 0) + 1
    return default_hooks.allreduce_hook(None, bucket)


# DDP checks a hook's annotations against the real types; this module's are strings
# (``from __future__ import annotations``).
counting_ddp_hook.__annotations__ = {
    "state": dict,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def counted_ddp(model: torch.nn.Module, state: dict[str, int]) -> DistributedDataParallel:
    """``model`` in DDP, its buckets' all-reduces counted into ``state``
    (:func:`counting_ddp_hook`)."""
    wrapped = DistributedDataParallel(model)
    wrapped.register_comm_hook(state, counting_ddp_hook)
    return wrapped


def run_collective(kind: str, numel: int, world_size: int) -> None:
    """One collective of ``kind`` (:data:`COLLECTIVE_KINDS`) on ``numel`` float32 ones: rooted
    ones at the last rank, the all-gather into an N-fold output, the reduce-scatter of the
    largest multiple of N elements. gloo lacks some: those raise what torch raises."""
    tensor = torch.ones(numel)
    if kind == "all_reduce":
        dist.all_reduce(tensor)
    elif kind == "reduce":
        dist.reduce(tensor, dst=world_size - 1)
    elif kind == "broadcast":
        dist.broadcast(tensor, src=world_size - 1)
    elif kind == "all_gather":
        dist.all_gather_into_tensor(torch.empty(numel * world_size), tensor)
    elif kind == "all_to_all":
        dist.all_to_all_single(
            torch.empty(numel // world_size * world_size),
            tensor[: numel // world_size * world_size],
        )
    elif kind == "reduce_scatter":
        output = torch.empty(numel // world_size)
        dist.reduce_scatter_tensor(output, tensor[: numel // world_size * world_size])
    else:
        raise ValueError(f"collective {kind!r} is not known; use one of {COLLECTIVE_KINDS}")
