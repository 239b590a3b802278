"""DeepSpeed checkpoints that keep GradNormLoRP's state and resume at any world size.

``engine.save_checkpoint`` alone already keeps our projectors and low-rank states (DeepSpeed
saves each rank's ``optimizer.state_dict()``), and ``engine.load_checkpoint`` restores them on
the same number of ranks. DeepSpeed cannot load those rigid ZeRO files on another number of
ranks, and its universal-checkpoint converter assumes optimizer states shaped like the
parameters, which low-rank states are not. :func:`save_checkpoint` therefore also writes, next to
DeepSpeed's files, one world-size-free optimizer shard per rank, the client state and a small
layout record; :func:`initialize_from_checkpoint` resumes from such a folder on any number of
ranks: same number, DeepSpeed's own load; another, the exact fp32 weights rebuilt from the ZeRO
partitions by DeepSpeed's ``zero_to_fp32`` (or the module file at stage 0), our shards merged
and re-cut for the new ranks (:mod:`gnlorp_dist.optim.fragment_state`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gnlorp_dist.distributed import load_sharded_optimizer, save_sharded_optimizer
from gnlorp_dist.integrations.deepspeed.config import initialize
from gnlorp_dist.optim.comm import buffer_device, wait_all
from gnlorp_dist.optim.fragment_state import (
    LAYOUT_KEY,
    export_flattened_state,
    merge_flattened_states,
)

LAYOUT_FILE = "gnlorp_layout.json"
CLIENT_STATE_FILE = "gnlorp_client_state.pt"
FLAT_SHARD = "gnlorp-flat-optimizer-{rank:05d}-of-{world:05d}.pt"


def _barrier(optimizer: Any) -> None:
    # The token travels: on the communicator's device (NCCL takes GPU tensors only).
    device = buffer_device(optimizer.comm, torch.device("cpu"))
    wait_all([optimizer.comm.all_reduce_sum(torch.zeros(1, device=device))])


def any_rank(optimizer: Any, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank calls it)."""
    comm = optimizer.comm
    if comm.world_size == 1:
        return flag
    device = buffer_device(comm, torch.device("cpu"))
    total = torch.tensor([float(flag)], device=device)
    wait_all([comm.all_reduce_sum(total)])
    return bool(total.item() > 0)


def save_checkpoint(
    engine: Any,
    optimizer: Any,
    save_dir: str | os.PathLike,
    tag: str,
    client_state: dict[str, Any] | None = None,
) -> Path:
    """``engine.save_checkpoint`` plus our reshardable optimizer shards (every rank calls it)."""
    client_state = client_state or {}
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state)
    folder = Path(save_dir) / tag
    rank, world = optimizer.comm.rank, optimizer.comm.world_size
    flattened = LAYOUT_KEY in optimizer.state
    if flattened:
        shard = {"world_size": world, "state": export_flattened_state(optimizer)}
        torch.save(shard, folder / FLAT_SHARD.format(rank=rank, world=world))
    else:
        save_sharded_optimizer(optimizer, folder)
    if rank == 0:
        torch.save(client_state, folder / CLIENT_STATE_FILE)
        layout = {
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "bf16": bool(engine.bfloat16_enabled()),
            "flattened": flattened,
        }
        (folder / LAYOUT_FILE).write_text(json.dumps(layout))
    _barrier(optimizer)
    return folder


def read_layout(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {LAYOUT_FILE}: its save did not finish (DeepSpeed's files are "
            "written before ours), or it was written by engine.save_checkpoint alone, which "
            "resumes only on the same number of ranks, with engine.load_checkpoint"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from err


def _fp32_weights(folder: Path, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    if layout["zero_stage"] >= 1:
        from deepspeed.utils.zero_to_fp32 import (  # noqa: PLC0415
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    if layout["bf16"]:
        raise ValueError(
            f"{folder}: a ZeRO-0 bf16 checkpoint keeps its fp32 master weights only for its own "
            "ranks; resume it on its own number of ranks "
            f"({layout['world_size']}), or train with ZeRO 1-3 to resume anywhere"
        )
    module = torch.load(
        folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    return {name: tensor.float() for name, tensor in module.items()}


def _load_optimizer_shards(optimizer: Any, folder: Path, layout: dict[str, Any]) -> None:
    world = layout["world_size"]
    if not layout["flattened"]:
        load_sharded_optimizer(optimizer, folder)
        return
    paths = [folder / FLAT_SHARD.format(rank=r, world=world) for r in range(world)]
    missing = [r for r, p in zip(range(world), paths) if not p.is_file()]
    if missing:
        raise ValueError(f"{folder}: optimizer shards of ranks {missing} are missing")
    # Onto the CPU; adopt_loaded_state moves each tensor to its fragment's device at step 1.
    shards = [torch.load(p, map_location="cpu", weights_only=True)["state"] for p in paths]
    optimizer.load_engine_state(merge_flattened_states(shards))


def initialize_from_checkpoint(
    *,
    model: torch.nn.Module,
    optimizer: Any,
    config: Any,
    checkpoint: str | os.PathLike,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """``deepspeed.initialize`` resumed from ``checkpoint`` (a tag folder written by
    :func:`save_checkpoint`) on any number of ranks; returns the engine and the client state.

    Call it with the model and optimizer freshly built (as for a new run). The DeepSpeed
    config may change between save and load (ZeRO stage, offload), except that a checkpoint
    of flattened states (ZeRO 1-3) resumes under ZeRO 1-3 only, and a ZeRO-0 one under ZeRO-0.
    """
    import deepspeed  # noqa: PLC0415

    folder = Path(checkpoint)
    layout = read_layout(folder)
    deepspeed.init_distributed()
    world = optimizer.comm.world_size
    if layout["world_size"] == world:
        engine, *_ = initialize(model=model, optimizer=optimizer, config=config, **kwargs)
        path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint {folder}")
        return engine, client_state
    weights = _fp32_weights(folder, layout)
    loaded = model.load_state_dict(weights, strict=False)
    trainable = {name for name, p in model.named_parameters()}
    if loaded.unexpected_keys or set(loaded.missing_keys) & trainable:
        raise ValueError(
            f"{folder}: its weights do not fit this model (missing {loaded.missing_keys}, "
            f"unexpected {loaded.unexpected_keys}); build the model the checkpoint was saved from"
        )
    engine, *_ = initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    stage = engine.zero_optimization_stage()
    if (stage >= 1) != layout["flattened"]:
        raise ValueError(
            f"{folder} was saved under ZeRO-{layout['zero_stage']}; resuming it on another "
            f"number of ranks needs ZeRO {'1-3' if layout['flattened'] else '0'} (got ZeRO-{stage})"
        )
    if engine.bfloat16_enabled():
        # DeepSpeed built the fp32 masters from the bf16 cast; put the exact ones back.
        from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415

        for name, param in model.named_parameters():
            if param.requires_grad and (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")):
                safe_set_full_fp32_param(param, weights[name].to(param.device))
    _load_optimizer_shards(optimizer, folder, layout)
    client_state = torch.load(folder / CLIENT_STATE_FILE, map_location="cpu", weights_only=False)
    return engine, client_state
