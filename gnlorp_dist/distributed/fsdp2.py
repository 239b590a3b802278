"""FSDP2 (``torch.distributed.fsdp.fully_shard``): sharding a model and its DCP checkpoints.

:func:`fully_shard_model` shards each decoder layer, then the root (torchtitan's recipe): every
parameter becomes a ``DTensor`` with placement ``Shard(0)`` (this rank's rows), a layer's
parameters are all-gathered just before it runs and freed after. Build the optimizer AFTER
sharding, from ``model.parameters()``: an optimizer built before holds the unsharded tensors,
which FSDP2 has replaced.

:func:`save_dcp_checkpoint` / :func:`load_dcp_checkpoint` write and read the model and optimizer
with ``torch.distributed.checkpoint`` (DCP) through ``get_state_dict`` / ``set_state_dict``:
each rank writes its own shards (no full gather anywhere), and DCP re-cuts them on load, so a
checkpoint saved on N ranks loads on M.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist.distributed.launch import process_group_options

EXTRA_FILE = "extra.pt"
"""Rank 0's small non-tensor-sharded state (scheduler, RNG, counters) beside the DCP files."""
DCP_METADATA_FILE = ".metadata"
"""DCP's index of every saved shard, written by rank 0 (its presence marks a DCP folder)."""
# Where decoder layers live: HF LLaMA/Mistral/Qwen (model.layers), GPT-2 (transformer.h),
# GPT-NeoX (gpt_neox.layers), and plain stacks (layers, blocks).
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "layers", "blocks", "h")


def is_fsdp2_model(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` (or any module inside it)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` (each becomes one FSDP2 unit), or a ValueError."""
    for path in _LAYER_PATHS:
        found: Any = model
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    raise ValueError(
        f"fully_shard_model found no decoder layers in {type(model).__name__}: it looks for an "
        f"nn.ModuleList at one of {', '.join(_LAYER_PATHS)}. Apply torch's fully_shard to your "
        "model's blocks and then to the root yourself, or pass the causal-LM model itself "
        "(e.g. LlamaForCausalLM, not a wrapper around it)"
    )


def fully_shard_model(
    model: nn.Module,
    *,
    reshard_after_forward: bool = True,
    mixed_precision: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """Apply FSDP2 to each decoder layer, then to the root; returns ``model`` (sharded in place).

    Needs an initialised default process group. The model must be on this rank's device and hold
    the same weights on every rank (seeded init, or loaded): each rank keeps its rows of them.
    ``reshard_after_forward=False`` keeps the gathered layers from forward to backward (more
    memory, one all-gather less per layer); ``mixed_precision`` is FSDP2's policy (e.g.
    ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``)."""
    if not dist.is_initialized():
        raise ValueError(
            "fully_shard_model needs torch.distributed's process group: launch with torchrun "
            "(or accelerate launch) and call init_distributed / init_process_group first"
        )
    if isinstance(model, DistributedDataParallel) or any(
        isinstance(m, FSDP1) for m in model.modules()
    ):
        raise ValueError(
            f"fully_shard_model got a model already wrapped by {type(model).__name__} (DDP or "
            "FSDP1): FSDP2 shards the plain module; pass the model before wrapping it"
        )
    if is_fsdp2_model(model):
        raise ValueError(
            "fully_shard_model got a model fully_shard was already applied to; shard it once"
        )
    # The mesh on the model's device type: fully_shard's default follows torch's accelerator,
    # which is CUDA on a GPU host even for a model kept on the CPU over gloo (--device cpu).
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward, "mesh": mesh}
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # The root holds what no layer owns (embeddings, final norm, lm_head). Its parameters are
    # needed again first in backward, so keeping them gathered saves one all-gather.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def init_single_process_group(device: torch.device | str = "cpu") -> None:
    """A one-rank default process group (in-memory store, no network) when none exists: FSDP2
    and DCP need one even alone, e.g. to resume an N-rank --fsdp checkpoint on one process."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    options = process_group_options(backend, device, local_rank=0)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **options)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP2 model, on every rank: a collective."""
    options = StateDictOptions(full_state_dict=True)
    return {k: v.detach() for k, v in get_model_state_dict(model, options=options).items()}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb+") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dcp_state(folder: str | os.PathLike, model: nn.Module, optimizer: Any) -> None:
    """Every rank writes its shards of ``model`` and ``optimizer`` into ``folder`` (a collective;
    no atomicity: see :func:`save_dcp_checkpoint`)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def read_dcp_state(folder: str | os.PathLike, model: nn.Module, optimizer: Any) -> None:
    """Load ``folder``'s shards into ``model`` and ``optimizer`` in place, re-cut to this job's
    world size (a collective)."""
    folder = Path(folder)
    if not (folder / DCP_METADATA_FILE).is_file():
        raise ValueError(
            f"{folder} holds no torch.distributed.checkpoint data ({DCP_METADATA_FILE} missing): "
            "it was not written by save_dcp_checkpoint, or the write did not finish"
        )
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def save_dcp_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: Any,
    extra: dict[str, Any],
    *,
    before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model``, ``optimizer`` (sharded, DCP) and ``extra`` into ``directory``, atomically.

    Every rank calls it. The shards go to a sibling ``<name>.tmp-dcp`` folder; rank 0 adds
    ``extra`` (``torch.save``: tensors and plain values), runs ``before_rename(tmp)`` (to add
    files, e.g. a manifest), fsyncs, and renames the folder into place after a barrier. A job
    killed mid-write leaves only the ``.tmp-dcp`` folder; an existing ``directory`` is replaced.
    """
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-dcp")
    rank = _rank()
    if rank == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    write_dcp_state(tmp, model, optimizer)
    _barrier()  # every rank's shard is on disk
    if rank == 0:
        torch.save(extra, tmp / EXTRA_FILE)
        if before_rename is not None:
            before_rename(tmp)
        _fsync_tree(tmp)
        if directory.exists():  # a step saved twice (a resumed run at its last step)
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)  # the rename itself
    _barrier()
    return directory


def load_dcp_checkpoint(
    directory: str | os.PathLike, model: nn.Module, optimizer: Any
) -> dict[str, Any]:
    """Load a :func:`save_dcp_checkpoint` folder into ``model`` and ``optimizer`` (in place, on
    any world size) and return its ``extra``. Every rank calls it."""
    directory = Path(directory)
    read_dcp_state(directory, model, optimizer)
    return torch.load(directory / EXTRA_FILE, weights_only=True, map_location="cpu")
