"""``gnlorp-train --fsdp`` checkpoints: DCP shards plus the loop's state, in the usual layout.

Same folder names, branches, manifest and pruning as :mod:`gnlorp_dist.checkpoint.store`; the model
and optimizer are ``torch.distributed.checkpoint`` shards instead of ``model.safetensors`` and
``optimizer-shard-*.pt``::

    checkpoints/step-00000100/   .metadata, __<rank>_0.distcp  model + optimizer (DCP: one file
                                                     per rank, re-cut on load to any world size)
                                 extra.pt            scheduler and RNG states (rank 0)
                                 run_config.json     the run's configuration
                                 trainer_state.json  step, data position, branch, "layout"
                                 manifest.json       every file's size and sha256; written last

Written into ``step-XXXXXXXX.tmp-dcp`` and renamed by rank 0 after every rank's shard is on
disk (:func:`gnlorp_dist.distributed.save_dcp_checkpoint`). No rank ever holds the whole model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gnlorp_dist.checkpoint.branches import step_dir_name
from gnlorp_dist.checkpoint.manifest import nonfinite_tensors, read_json, write_manifest
from gnlorp_dist.checkpoint.store import (
    CONFIG_FILE,
    FORMAT_VERSION,
    STATE_FILE,
    TrainerState,
    capture_rng_state,
    checkpoints_root,
    current_branch,
    prune_checkpoints,
    remove_stale_tmp_dirs,
    restore_rng_state,
)
from gnlorp_dist.distributed import DistributedContext, load_dcp_checkpoint, save_dcp_checkpoint
from gnlorp_dist.distributed.fsdp2 import local_tensor
from gnlorp_dist.training.schedule import sync_lr_to_schedule

LAYOUT = "fsdp2-dcp"
"""``trainer_state.json``'s ``layout`` in a checkpoint written under ``--fsdp``."""


def is_dcp_checkpoint(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by :func:`save_dcp_training_checkpoint`."""
    state_path = Path(folder) / STATE_FILE
    if not state_path.is_file():
        return False
    state = read_json(state_path)
    return isinstance(state, dict) and state.get("layout") == LAYOUT


def check_layout_matches(folder: str | os.PathLike, fsdp: bool) -> None:
    """ValueError when a DCP checkpoint is resumed without --fsdp, or the reverse."""
    dcp = is_dcp_checkpoint(folder)
    if dcp and not fsdp:
        raise ValueError(
            f"checkpoint {folder} was written with --fsdp (torch.distributed.checkpoint shards); "
            "resume it with --fsdp (on any number of processes), or use another --output-dir"
        )
    if fsdp and not dcp:
        raise ValueError(
            f"checkpoint {folder} was written without --fsdp (a DDP/one-process checkpoint); "
            "resume it without --fsdp (on any number of processes), or start the --fsdp run in "
            "another --output-dir"
        )


def _json_save(obj: Any, path: Path) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _refuse_nonfinite(
    step: int, model: nn.Module, optimizer: torch.optim.Optimizer, context: DistributedContext
) -> None:
    """Every rank checks its own shards; if any rank found a NaN or infinity, every rank raises
    the same ValueError before anything is written (the previous checkpoints stay)."""
    named: list[tuple[str, Any]] = [
        (f"model {k}", local_tensor(v)) for k, v in model.state_dict().items()
    ]
    for index, state in enumerate(optimizer.state.values()):
        if isinstance(state, dict):
            named += [
                (f"optimizer state {k!r} of parameter {index}", local_tensor(v))
                for k, v in state.items()
                if torch.is_tensor(v)
            ]
    bad = nonfinite_tensors(named)
    if context.communicator is not None:  # every rank must take the same branch
        gathered = context.communicator.all_gather_object(bad)
        bad = sorted({name for names in gathered for name in names})  # type: ignore[attr-defined]
    if not bad:
        return
    message = (
        f"refusing to write the checkpoint of step {step}: non-finite values in "
        f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. Training diverged; the "
        "previous checkpoints are kept: resume from them with a lower --lr or with --grad-clip"
    )
    logging.getLogger(__name__).error(message)
    raise ValueError(message)


def save_dcp_training_checkpoint(
    output_dir: str | os.PathLike,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_state: dict[str, Any],
    run_config: dict[str, Any],
    context: DistributedContext,
    keep: int = 0,
    extra: dict[str, Any] | None = None,
    skips_in_a_row: int = 0,
) -> Path:
    """Write the checkpoint of ``step`` atomically (every rank calls this) and prune to the
    newest ``keep`` of the current branch."""
    root = checkpoints_root(output_dir)
    branch = current_branch(output_dir)["branch"]
    final = root / step_dir_name(step, branch)
    _refuse_nonfinite(step, model, optimizer, context)
    if context.is_main:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_dirs(root)  # a killed job's leftovers; the save's barrier follows
    state = {
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "step": step,
        "branch": branch,
        "world_size": context.world_size,
        "data_state": data_state,
        "skips_in_a_row": skips_in_a_row,
        "extra": extra or {},
    }

    def before_rename(tmp: Path) -> None:  # rank 0, once every shard is on disk
        _json_save(run_config, tmp / CONFIG_FILE)
        _json_save(state, tmp / STATE_FILE)
        write_manifest(tmp, step=step, branch=branch)  # last: it covers every other file

    loop_state = {"scheduler": scheduler.state_dict(), "rng": capture_rng_state()}
    save_dcp_checkpoint(final, model, optimizer, loop_state, before_rename=before_rename)
    if context.is_main:
        prune_checkpoints(output_dir, keep)
    context.barrier()
    return final


def load_dcp_training_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    restore_rng: bool = True,
) -> TrainerState:
    """Load a :func:`save_dcp_training_checkpoint` folder (verified by the caller) into the
    sharded ``model`` and ``optimizer``, on any world size; return the loop's state."""
    path = Path(checkpoint)
    check_layout_matches(path, fsdp=True)
    state = read_json(path / STATE_FILE)
    try:
        loop_state = load_dcp_checkpoint(path, model, optimizer)
    except ValueError:
        raise
    except Exception as err:  # DCP's CheckpointException, unpickling errors, missing files
        raise ValueError(
            f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); resume from an "
            "older complete checkpoint"
        ) from err
    scheduler.load_state_dict(loop_state["scheduler"])
    sync_lr_to_schedule(scheduler)
    if restore_rng:
        restore_rng_state(loop_state["rng"])
    return TrainerState(
        step=state["step"],
        data_state=state["data_state"],
        extra=state["extra"],
        skips_in_a_row=int(state.get("skips_in_a_row", 0)),
    )
