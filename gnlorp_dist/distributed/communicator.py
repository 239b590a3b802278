"""The optimizer's collectives over ``torch.distributed`` (the one module that imports it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


def nccl_device(local_rank: str | None, current: int, count: int) -> torch.device:
    """The GPU this rank's NCCL collectives take tensors on.

    ``current``: the current CUDA device. Anything but 0 means the process chose its GPU
    (``torch.cuda.set_device``), which wins. At 0 it may just be the default:
    ``deepspeed.init_distributed()`` and a bare ``init_process_group`` never make this rank's
    GPU current, so every rank would put its buffers on GPU 0; ``LOCAL_RANK`` (``local_rank``,
    as the launcher exported it) then names the GPU, when this process sees that many
    (``count``: with one GPU visible per process, ``CUDA_VISIBLE_DEVICES`` already chose it).
    """
    if current == 0 and local_rank is not None and local_rank.strip().isdigit():
        index = int(local_rank)
        if index < count:
            return torch.device("cuda", index)
    return torch.device("cuda", current)


def collective_device(
    backend: str,
    env: Mapping[str, str] | None = None,
    current: int | None = None,
    count: int | None = None,
) -> torch.device:
    """Where a ``backend`` group's collectives take tensors: :func:`nccl_device` for NCCL (also
    inside a multi-backend string such as ``"cpu:gloo,cuda:nccl"``), the CPU otherwise (gloo
    also takes CUDA tensors). ``env``, ``current`` and ``count`` default to this process's."""
    if "nccl" not in backend:
        return torch.device("cpu")
    env = os.environ if env is None else env
    current = torch.cuda.current_device() if current is None else current
    count = torch.cuda.device_count() if count is None else count
    return nccl_device(env.get("LOCAL_RANK"), current, count)


class ProcessGroupCommunicator:
    """:class:`gnlorp_dist.optim.comm.Communicator` over a ``torch.distributed`` process group.

    Create it after ``torch.distributed.init_process_group`` (torchrun, Accelerate and DeepSpeed
    all do that) and pass it to ``GradNormLoRPAdamW(..., communicator=...)``. Collectives run
    asynchronously; the optimizer waits on their handles at the end of each phase.

    ``device`` is where its collectives take tensors: this rank's GPU for NCCL
    (:func:`collective_device`: the current one once set, else ``LOCAL_RANK``'s), the CPU for
    gloo (which also takes CUDA tensors). Under NCCL it is resolved again at each read until
    the first collective fixes it, so an optimizer built before ``torch.cuda.set_device`` still
    uses the GPU set afterwards. A tensor elsewhere is refused with a ValueError before it
    reaches the process group (a device comparison, no host sync).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group "
                "(or launch with torchrun / accelerate launch / deepspeed) before creating a "
                "ProcessGroupCommunicator"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._backend = str(dist.get_backend(group))
        # NCCL: fixed at the first collective (the GPU its communicator binds to); gloo: now.
        self._device = None if "nccl" in self._backend else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        return collective_device(self._backend)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def _check_device(self, tensor: Tensor, op: str) -> None:
        if self._device is None:
            self._device = collective_device(self._backend)
        # NCCL fails obscurely (or hangs a peer) on a host tensor; name the tensor here instead.
        if tensor.device == self.device:
            return
        if self.device.type == "cpu" and tensor.device.type == "cuda":
            return  # gloo moves CUDA tensors itself
        raise ValueError(
            f"{op}: a tensor of shape {tuple(tensor.shape)} on {tensor.device}, but this "
            f"communicator's collectives ({self._backend}) take tensors on "
            f"{self.device}; allocate collective buffers on communicator.device"
        )

    def broadcast(self, tensor: Tensor, src: int) -> dist.Work | None:
        assert tensor.is_contiguous(), "broadcast needs a contiguous block"
        self._check_device(tensor, "broadcast")
        return dist.broadcast(tensor, src=self._global(src), group=self.group, async_op=True)

    def all_reduce_sum(self, tensor: Tensor) -> dist.Work | None:
        self._check_device(tensor, "all_reduce_sum")
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def reduce_sum(self, tensor: Tensor, dst: int) -> dist.Work | None:
        assert tensor.is_contiguous(), "reduce needs a contiguous block"
        self._check_device(tensor, "reduce_sum")
        return dist.reduce(
            tensor, dst=self._global(dst), op=dist.ReduceOp.SUM, group=self.group, async_op=True
        )

    def all_to_all(
        self, output: Tensor, input: Tensor, output_splits: list[int], input_splits: list[int]
    ) -> dist.Work | None:
        assert input.is_contiguous() and output.is_contiguous(), "all-to-all needs flat blocks"
        self._check_device(input, "all_to_all")
        self._check_device(output, "all_to_all")
        return dist.all_to_all_single(
            output,
            input,
            output_split_sizes=output_splits,
            input_split_sizes=input_splits,
            group=self.group,
            async_op=True,
        )

    def all_gather_object(self, obj: object) -> list[object]:
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def all_ranks_arrive(self, tag: str, timeout_s: float) -> bool:
        """Whether every rank of the group makes this call within ``timeout_s`` seconds.

        Through the default group's key-value store (the rendezvous store), not a collective,
        so a rank that calls alone gets False after ``timeout_s`` instead of hanging. Arrivals
        are counted in the store: the ``world_size`` calls numbered ``g * world_size + 1`` to
        ``(g + 1) * world_size`` form generation ``g``, whose last arrival releases the others.
        A rank that times out withdraws its count, so the ranks' next calls still pair up.
        """
        members = ",".join(str(self._global(r)) for r in range(self.world_size))
        scope = f"gnlorp/arrive/{tag}/{members}"
        store = dist.distributed_c10d._get_default_store()
        count = store.add(f"{scope}/count", 1)
        generation = (count - 1) // self.world_size
        released = f"{scope}/released/{generation}"
        full = (generation + 1) * self.world_size
        if count == full:
            store.set(released, "1")
            return True
        try:
            store.wait([released], timedelta(seconds=timeout_s))
            return True
        except (RuntimeError, dist.DistError):  # the store's timeout
            pass
        if store.add(f"{scope}/count", -1) == full - 1:
            # The last peer arrived between the timeout and the withdrawal and is already on its
            # way into the collective: join it after all.
            store.add(f"{scope}/count", 1)
            store.wait([released])
            return True
        return False


def broadcast_parameters(module: torch.nn.Module, communicator: ProcessGroupCommunicator) -> None:
    """Give every rank rank 0's parameters and buffers (what DDP does at construction)."""
    with torch.no_grad():
        handles = [communicator.broadcast(t.data, src=0) for t in module.state_dict().values()]
    for handle in handles:
        if handle is not None:
            handle.wait()


def communicator_for_current_process() -> ProcessGroupCommunicator | None:
    """A communicator when ``torch.distributed`` runs with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCommunicator()
    return None
