"""Resumable training checkpoints, written atomically, and the merged final model.

Layout under ``output_dir``::

    checkpoints/step-00000100/   model.safetensors   the training model's state (unmerged)
                                 optimizer-shard-<r>-of-<N>.pt  GradNormLoRPAdamW's state, one
                                                     file per rank (reshardable to any world
                                                     size, see gnlorp_dist.distributed)
                                 optimizer.pt        other optimizers' state_dict (rank 0)
                                 scheduler.pt        LambdaLR state_dict
                                 rng_state.pt        torch / python / numpy (/ cuda) RNG states
                                 run_config.json     the run's configuration
                                 trainer_state.json  step, data position, counters; written last
    final/                       merged model (save_pretrained, safetensors) + tokenizer

A checkpoint is written into a sibling ``step-XXXXXXXX.tmp-<pid>`` folder (``.tmp-job`` when
several ranks write into it, rank 0 renaming it after a barrier), every file fsynced, then
renamed into place with ``os.replace``: a process killed mid-write leaves only a ``*.tmp*``
folder, which resume never considers and the next save deletes. Every ``.pt`` file holds
tensors and plain Python values only and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from gnlorp_dist.distributed import load_sharded_optimizer, save_sharded_optimizer
from gnlorp_dist.optim import GradNormLoRPAdamW
from gnlorp_dist.schedule import sync_lr_to_schedule

FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
FINAL_SUBDIR = "final"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
CONFIG_FILE = "run_config.json"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(kw_only=True)
class TrainerState:
    """The loop's own position, saved as JSON next to the tensors."""

    step: int
    """Optimizer steps completed."""
    data_state: dict[str, Any]
    """The batch source's state_dict (epoch and position in the data order)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Counters for the log (tokens seen, last loss); not needed to continue exactly."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_SUBDIR


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first; ``*.tmp*`` folders never count."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------ RNG


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the loop may draw from, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- write


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _json_save(obj: Any, path: Path) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _save_model(model: torch.nn.Module, path: Path) -> None:
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)


def remove_stale_tmp_dirs(root: Path) -> None:
    """Delete ``*.tmp*`` folders that a killed writer left behind."""
    if root.is_dir():
        for path in root.iterdir():
            if ".tmp" in path.name and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep <= 0``: keep all)."""
    found = complete_checkpoints(output_dir)
    doomed = found[:-keep] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_state: dict[str, Any],
    run_config: dict[str, Any],
    keep: int = 0,
    extra: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a complete checkpoint for ``step`` atomically and prune to the newest ``keep``.

    With several ranks every rank calls this: each writes its optimizer shard, rank 0 the rest,
    and rank 0 renames the folder into place once ``barrier`` says every shard is on disk.
    """
    root = checkpoints_root(output_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid() if world_size == 1 else 'job'}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_dirs(root)
        tmp.mkdir()
    barrier()
    _save_optimizer(optimizer, tmp, rank)
    if rank == 0:
        _save_model(model, tmp / MODEL_FILE)
        _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        _torch_save(capture_rng_state(), tmp / RNG_FILE)
        _json_save(run_config, tmp / CONFIG_FILE)
    barrier()
    if rank == 0:
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "data_state": data_state,
            "extra": extra or {},
        }
        _json_save(state, tmp / STATE_FILE)  # last: its presence marks the folder complete
        _fsync_dir(tmp)
        if final.exists():  # only when a step is saved twice (a resumed run at its last step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(output_dir, keep)
    barrier()
    return final


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path, rank: int) -> None:
    if isinstance(optimizer, GradNormLoRPAdamW):
        save_sharded_optimizer(optimizer, folder)
    elif rank == 0:  # other optimizers are replicated on every rank
        _torch_save(optimizer.state_dict(), folder / OPTIMIZER_FILE)


def _load_optimizer(
    optimizer: torch.optim.Optimizer, folder: Path, device: torch.device | str = "cpu"
) -> None:
    if isinstance(optimizer, GradNormLoRPAdamW):
        if not any(folder.glob("optimizer-shard-*")):
            raise ValueError(
                f"checkpoint {folder} holds no GradNormLoRPAdamW shards (optimizer-shard-*.pt); "
                "it was written for another optimizer"
            )
        load_sharded_optimizer(optimizer, folder)
    else:
        optimizer.load_state_dict(
            torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location=device)
        )


# ----------------------------------------------------------------------------------------- read


def read_run_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / CONFIG_FILE).read_text())


def check_compatible(
    saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str], checkpoint: str
) -> None:
    """ValueError naming every field in ``keys`` whose value differs from the checkpoint's."""
    diffs = []
    for key in keys:
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):  # name the differing sub-fields
            for sub in sorted(old.keys() | new.keys()):
                if old.get(sub) != new.get(sub):
                    diffs.append(f"{key}.{sub}: checkpoint {old.get(sub)!r}, now {new.get(sub)!r}")
        elif old != new:
            diffs.append(f"{key}: checkpoint {old!r}, now {new!r}")
    if diffs:
        raise ValueError(
            f"checkpoint {checkpoint} is incompatible with this run ({'; '.join(diffs)}); "
            "use the same settings, another --output-dir, or --resume never with a fresh one"
        )


def load_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    restore_rng: bool = True,
    device: torch.device | str = "cpu",
) -> TrainerState:
    """Load model, optimizer, scheduler (and RNG) state in place; return the loop's state.

    Tensors are read onto ``device`` (the run's), whatever device wrote them: a checkpoint
    saved on a GPU resumes on a CPU-only machine and the other way round."""
    path = Path(checkpoint)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{str(path)!r} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {state.get('format_version')!r}; "
            f"this gnlorp_dist reads version {FORMAT_VERSION}"
        )
    model.load_state_dict(load_file(str(path / MODEL_FILE), device=str(device)), strict=True)
    _load_optimizer(optimizer, path, device)
    scheduler.load_state_dict(
        torch.load(path / SCHEDULER_FILE, weights_only=True, map_location="cpu")
    )
    if isinstance(scheduler, LambdaLR):
        sync_lr_to_schedule(scheduler)
    if restore_rng:
        # RNG states are host byte tensors, whatever device the run computes on.
        restore_rng_state(torch.load(path / RNG_FILE, weights_only=True, map_location="cpu"))
    return TrainerState(step=state["step"], data_state=state["data_state"], extra=state["extra"])


# -------------------------------------------------------------------------------- final model


def save_merged_model(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    merge: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Save ``merge(copy of model)`` with ``save_pretrained`` (safetensors) and the tokenizer to
    ``output_dir/final``, atomically. The training model is left untouched."""
    final = Path(output_dir) / FINAL_SUBDIR
    tmp = final.with_name(f"{FINAL_SUBDIR}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged = copy.deepcopy(model)
    if merge is not None:
        merged = merge(merged)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if info is not None:
        _json_save(info, tmp / "gnlorp_train.json")
    for file in tmp.iterdir():
        if file.is_file():
            _fsync_file(file)
    _fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f"{FINAL_SUBDIR}.old-tmp-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final
