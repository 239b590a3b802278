"""Resumable training checkpoints, written atomically, and the layout of a run's output folder.

Layout under ``output_dir``::

    checkpoints/step-00000100/   model.safetensors   the training model's state (unmerged)
                                 optimizer-shard-<r>-of-<N>.pt  GradNormLoRPAdamW's state, one
                                                     file per rank (reshardable to any world
                                                     size, see gnlorp_dist.distributed)
                                 optimizer.pt        other optimizers' state_dict (rank 0)
                                 scheduler.pt        LambdaLR state_dict
                                 rng_state.pt        torch / python / numpy (/ cuda) RNG states
                                 run_config.json     the run's configuration
                                 trainer_state.json  step, data position, branch, counters
                                 manifest.json       every file's size + sha256 and
                                                     "all_finite": true; written last
    checkpoints/step-00000040-b1a2b3c4/  a checkpoint of branch b1a2b3c4 (see below)
    checkpoints/branch.json      the current branch and the checkpoint it started from
    final/                       merged model (save_pretrained, safetensors) + tokenizer,
                                 written by gnlorp_dist.checkpoint.merged
    .lock                        pid, host and start time of the run using the folder

Branches: a run that resumes from a checkpoint other than its branch's newest (an older one
named by --resume, or the previous one when the newest fails verification) starts a new branch
(``branch.json``); its checkpoints carry the branch id in their folder name, pruning by
--keep-checkpoints only counts the current branch's, and ``--resume auto`` only looks at the
current branch (then at the checkpoint it started from). The first branch ("main") keeps the
plain ``step-XXXXXXXX`` names.

Verification (:mod:`gnlorp_dist.checkpoint.manifest`): before a checkpoint is used, every file
is checked against the manifest; ``--resume auto`` skips one that fails with a warning naming
the file and takes the previous one. Checkpoints of format 1 (no manifest) load with a warning
that they are unverified. A save that finds a NaN or infinity in the model or the optimizer
state writes nothing and raises ValueError (the previous checkpoints stay).

A checkpoint is written into a sibling ``step-XXXXXXXX.tmp-<pid>`` folder (``.tmp-job`` when
several ranks write into it, rank 0 renaming it after a barrier), every file fsynced, then
renamed into place with ``os.replace``: a process killed mid-write leaves only a ``*.tmp*``
folder, which resume never considers and the next save deletes. Every ``.pt`` file holds
tensors and plain Python values only and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from gnlorp_dist.checkpoint.branches import begin_branch_if_needed as begin_branch
from gnlorp_dist.checkpoint.branches import (
    branch_folders,
    read_branch,
    step_dir_name,
    step_folders,
)
from gnlorp_dist.checkpoint.branches import resume_candidates as branch_candidates
from gnlorp_dist.checkpoint.manifest import (
    MANIFEST_FILE,
    model_and_optimizer_nonfinite,
    read_json,
    verify_manifest,
    warn,
    write_manifest,
)
from gnlorp_dist.checkpoint.space import disk_full_error, is_disk_full
from gnlorp_dist.distributed import load_sharded_optimizer, save_sharded_optimizer
from gnlorp_dist.optim import GradNormLoRPAdamW
from gnlorp_dist.training.faults import fault_point
from gnlorp_dist.training.schedule import sync_lr_to_schedule

FORMAT_VERSION = 2
"""2: manifest.json and branches. Version 1 checkpoints (no manifest) still load, unverified."""
READABLE_VERSIONS = (1, 2)
CHECKPOINTS_SUBDIR = "checkpoints"
FINAL_SUBDIR = "final"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
CONFIG_FILE = "run_config.json"
STATE_FILE = "trainer_state.json"
_NONFINITE_MARK = "nonfinite-rank-{rank}.json"


@dataclass(kw_only=True)
class TrainerState:
    """The loop's own position, saved as JSON next to the tensors."""

    step: int
    """Optimizer steps completed."""
    data_state: dict[str, Any]
    """The batch source's state_dict (epoch and position in the data order)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Counters for the log (tokens seen, last loss); not needed to continue exactly."""
    skips_in_a_row: int = 0
    """Steps skipped in a row for a non-finite gradient up to ``step`` (0 in checkpoints
    written before it was saved): ``--max-consecutive-skips`` counts across a resume."""


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_SUBDIR


def _has_state(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def current_branch(output_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"branch": id, "parent": checkpoint path or None}`` from ``checkpoints/branch.json``
    (the first branch, "main", without parent, when there is none)."""
    return read_branch(checkpoints_root(output_dir))


def all_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str, Path]]:
    """``(step, branch, folder)`` of every complete checkpoint of every branch, by step."""
    return step_folders(checkpoints_root(output_dir), _has_state)


def complete_checkpoints(output_dir: str | os.PathLike, branch: str | None = None) -> list[Path]:
    """Complete checkpoints of ``branch`` (default: the current one), oldest first; ``*.tmp*``
    folders never count."""
    return branch_folders(checkpoints_root(output_dir), _has_state, branch)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The current branch's newest complete checkpoint (unverified), or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def check_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of ``folder`` once every file matches its manifest, or a ValueError
    naming the file at fault. A format-1 checkpoint (no manifest) passes with a warning."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not folder.is_dir() or not state_path.is_file():
        raise ValueError(
            f"{str(folder)!r} is not a complete gnlorp_dist checkpoint (no {STATE_FILE}); name "
            "a checkpoints/step-XXXXXXXX folder or a run's --output-dir"
        )
    manifest = verify_manifest(folder)
    state = read_json(state_path)
    version = state.get("format_version") if isinstance(state, dict) else None
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"checkpoint {folder} has format version {version!r} ({state_path}); this "
            f"gnlorp_dist reads versions {list(READABLE_VERSIONS)}"
        )
    if manifest is None:
        if version != 1:
            raise ValueError(
                f"checkpoint {folder} has no {MANIFEST_FILE}: it was not written completely by "
                "gnlorp_dist's save_checkpoint; resume from an older checkpoint"
            )
        warn(f"checkpoint {folder} has format version 1 (no {MANIFEST_FILE}): used unverified")
    return state


def resume_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Where ``--resume auto`` looks, in order: the current branch's checkpoints, newest first,
    then the checkpoint the branch started from."""
    return branch_candidates(checkpoints_root(output_dir), _has_state)


def select_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of the current branch that verifies (None when there is none);
    each one skipped is a warning naming its fault; a ValueError when none verifies."""
    candidates = resume_candidates(output_dir)
    faults = []
    for folder in candidates:
        try:
            check_checkpoint(folder)
        except ValueError as err:
            faults.append(str(err))
            warn(f"skipping checkpoint {folder}: {err}")
            continue
        return folder
    if faults:
        raise ValueError(
            f"no checkpoint in {output_dir} verifies ({'; '.join(faults)}); resume a verified "
            "checkpoint with --resume PATH, or start afresh with another --output-dir"
        )
    return None


def begin_branch_if_needed(output_dir: str | os.PathLike, resumed: Path) -> str | None:
    """After resuming ``resumed`` into ``output_dir`` (rank 0): start a new branch unless it is
    the current branch's head (its newest checkpoint, or the one it started from). The new
    branch id, or None when the current branch continues."""
    return begin_branch(checkpoints_root(output_dir), Path(resumed), _has_state)


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


def _torch_load(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")


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
    """Delete all but the newest ``keep`` complete checkpoints of the current branch (``keep <=
    0``: keep all); other branches' checkpoints are never touched."""
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
    skips_in_a_row: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a complete checkpoint for ``step`` atomically and prune to the newest ``keep``.

    With several ranks every rank calls this: each writes its optimizer shard, rank 0 the rest,
    and rank 0 renames the folder into place once ``barrier`` says every shard is on disk. A
    full disk removes the partial folder (rank 0) and raises :class:`DiskFullError`; the
    previous checkpoints stay.
    """
    root = checkpoints_root(output_dir)
    branch = current_branch(output_dir)["branch"]
    final = root / step_dir_name(step, branch)
    tmp = root / f"{final.name}.tmp-{os.getpid() if world_size == 1 else 'job'}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_dirs(root)
        tmp.mkdir()
    barrier()
    _refuse_nonfinite(tmp, step, model if rank == 0 else None, optimizer, rank, barrier)
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "branch": branch,
        "world_size": world_size,
        "data_state": data_state,
        "skips_in_a_row": skips_in_a_row,
        "extra": extra or {},
    }
    try:
        _write_files(tmp, state, model, optimizer, scheduler, run_config, rank, barrier)
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise _disk_full(output_dir, tmp, step, err, rank) from err
    if rank == 0:
        if final.exists():  # only when a step is saved twice (a resumed run at its last step)
            shutil.rmtree(final)
        fault_point("checkpoint.before_rename", step)
        os.replace(tmp, final)
        _fsync_dir(root)
        fault_point("checkpoint.after_rename", step)
        prune_checkpoints(output_dir, keep)
    barrier()
    return final


def _disk_full(
    output_dir: str | os.PathLike, tmp: Path, step: int, err: BaseException, rank: int
) -> Exception:
    last = latest_checkpoint(output_dir)
    kept = f"the last complete checkpoint, {last}, is kept" if last else "none was written before"
    what = f"the checkpoint of step {step}"
    return disk_full_error(tmp, what, err, kept=kept, remove=rank == 0)


def _write_files(
    tmp: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    run_config: dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
) -> None:
    """Every file of the checkpoint ``state`` describes into ``tmp``: this rank's optimizer
    shard, then (rank 0, once every shard is on disk) the rest, the manifest last."""
    step = state["step"]
    _save_optimizer(optimizer, tmp, rank)
    fault_point("checkpoint.after_optimizer", step)
    if rank == 0:
        _save_model(model, tmp / MODEL_FILE)
        fault_point("checkpoint.after_model", step)
        _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        _torch_save(capture_rng_state(), tmp / RNG_FILE)
        _json_save(run_config, tmp / CONFIG_FILE)
    barrier()
    if rank == 0:
        _json_save(state, tmp / STATE_FILE)
        write_manifest(tmp, step=step, branch=state["branch"])  # last: it covers every file
        _fsync_dir(tmp)


def _refuse_nonfinite(
    tmp: Path,
    step: int,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    rank: int,
    barrier: Callable[[], None],
) -> None:
    """Every rank checks its tensors; if any rank found a NaN or infinity, nothing is written,
    the previous checkpoints stay, and every rank raises the same ValueError (the ranks agree
    through marker files in the shared temporary folder)."""
    bad = model_and_optimizer_nonfinite(model, optimizer)
    if bad:
        _json_save(bad, tmp / _NONFINITE_MARK.format(rank=rank))
    barrier()
    marks = sorted(tmp.glob(_NONFINITE_MARK.format(rank="*")))
    if not marks:
        return
    found = [name for mark in marks for name in read_json(mark)]
    barrier()  # every rank has read the marks before rank 0 deletes them
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    message = (
        f"refusing to write the checkpoint of step {step}: non-finite values in "
        f"{', '.join(found[:8])}{' ...' if len(found) > 8 else ''}. Training diverged; the "
        "previous checkpoints are kept: resume from them with a lower --lr or with --grad-clip"
    )
    logging.getLogger(__name__).error(message)
    raise ValueError(message)


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
        file = folder / OPTIMIZER_FILE
        optimizer.load_state_dict(
            _read(file, lambda p: torch.load(p, weights_only=True, map_location=device))
        )


# ----------------------------------------------------------------------------------------- read


def read_run_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(checkpoint) / CONFIG_FILE)


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(path)
    except ValueError:
        raise
    except Exception as err:  # truncated safetensors, unpickling errors, missing files
        raise ValueError(
            f"checkpoint file {path} cannot be read ({type(err).__name__}: {err}); resume "
            "from an older complete checkpoint"
        ) from err


def load_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    restore_rng: bool = True,
    device: torch.device | str = "cpu",
    verify: bool = True,
) -> TrainerState:
    """Load model, optimizer, scheduler (and RNG) state in place; return the loop's state.

    Tensors are read onto ``device`` (the run's), whatever device wrote them: a checkpoint
    saved on a GPU resumes on a CPU-only machine and the other way round. The files are first
    checked against the manifest (``verify=False``: the caller just did)."""
    path = Path(checkpoint)
    state = check_checkpoint(path) if verify else read_json(path / STATE_FILE)
    model.load_state_dict(
        _read(path / MODEL_FILE, lambda p: load_file(str(p), device=str(device))), strict=True
    )
    _load_optimizer(optimizer, path, device)
    scheduler.load_state_dict(_read(path / SCHEDULER_FILE, _torch_load))
    if isinstance(scheduler, LambdaLR):
        sync_lr_to_schedule(scheduler)
    if restore_rng:
        # RNG states are host byte tensors, whatever device the run computes on.
        restore_rng_state(_read(path / RNG_FILE, _torch_load))
    return TrainerState(
        step=state["step"],
        data_state=state["data_state"],
        extra=state["extra"],
        skips_in_a_row=int(state.get("skips_in_a_row", 0)),
    )
