"""Checkpoint manifests, the finite-tensor guard, and the output folder's lock.

Every checkpoint folder ends with ``manifest.json``, written last (before the folder is renamed
into place): each file's size and sha256, and ``"all_finite": true`` (the save refused to write
any non-finite tensor). :func:`verify_manifest` checks every size and checksum before a
checkpoint is used; any mismatch, truncation or edit (a step count changed by hand included) is
a ValueError naming the file. Hashing reads every byte once, in 1 MiB chunks (about 1-2 s per
GB on one core); resume verifies each candidate once.

``<output-dir>/.lock`` holds the pid, host and start time of the run writing into the folder,
created with ``O_EXCL``; a second run refuses to start, and a lock whose process is gone (same
host) is taken over with a warning.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
LOCK_FILE = ".lock"
_CHUNK = 1 << 20


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or is used unverified; the message names the file."""


def warn(message: str) -> None:
    warnings.warn(message, CheckpointWarning, stacklevel=3)


# ------------------------------------------------------------------------------------- manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and ".tmp" not in p.name
    )


def write_manifest(folder: str | os.PathLike, **extra: Any) -> Path:
    """Hash every file under ``folder`` into ``folder/manifest.json`` (fsynced; write it last)."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in _listed_files(folder)
    }
    manifest = {"manifest_version": MANIFEST_VERSION, "all_finite": True, **extra, "files": files}
    path = folder / MANIFEST_FILE
    temporary = folder / f"{MANIFEST_FILE}.tmp-{os.getpid()}"
    with temporary.open("w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    return path


def read_json(path: Path) -> Any:
    """``path``'s JSON, or a ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} cannot be read ({type(err).__name__}: {err}): the file is truncated, "
            "edited or not a gnlorp_dist file"
        ) from err


def verify_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Check every file ``folder/manifest.json`` lists (size, then sha256) and that the save
    recorded every tensor finite; the manifest, None when there is none, or a ValueError
    naming the first file that does not match."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} is not a gnlorp_dist checkpoint manifest")
    if manifest.get("all_finite") is not True:
        raise ValueError(f"{path} does not record every tensor finite; the checkpoint is unusable")
    for name, entry in sorted(manifest["files"].items()):
        file = folder / name
        if not file.is_file():
            raise ValueError(f"checkpoint file {file} listed in {path} is missing")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise ValueError(
                f"checkpoint file {file} has {size} bytes, the manifest says {entry.get('size')}: "
                "it is truncated or was replaced"
            )
        if file_sha256(file) != entry.get("sha256"):
            raise ValueError(
                f"checkpoint file {file} does not match its sha256 in {path}: it was edited or "
                "corrupted"
            )
    return manifest


# --------------------------------------------------------------------------------- finiteness


def nonfinite_tensors(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors in ``named`` holding a NaN or an infinity."""
    bad = []
    for name, value in named:
        if torch.is_tensor(value) and value.is_floating_point() and value.numel():
            if not bool(torch.isfinite(value.detach()).all()):
                bad.append(name)
    return bad


def model_and_optimizer_nonfinite(
    model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> list[str]:
    """The non-finite tensors of ``model``'s state_dict and of ``optimizer``'s state."""
    named: list[tuple[str, Any]] = []
    if model is not None:
        named += [(f"model {k}", v) for k, v in model.state_dict().items()]
    if optimizer is not None:
        index = {
            id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
        }
        for param, state in optimizer.state.items():
            if isinstance(state, dict):
                where = index.get(id(param), param)
                named += [
                    (f"optimizer state {k!r} of parameter {where}", v) for k, v in state.items()
                ]
    return nonfinite_tensors(named)


# -------------------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path, record: dict[str, Any]) -> None:
    try:
        if json.loads(path.read_text()) == record:
            path.unlink()
    except (OSError, ValueError):
        pass


def acquire_lock(output_dir: str | os.PathLike) -> Path:
    """Take ``output_dir/.lock`` for this process (removed at exit), or raise ValueError naming
    the run that holds it. A lock left by a process that no longer runs on this host is taken
    over with a warning; this process's own lock is kept (sequential runs in one process)."""
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started": time.time()}
    for _attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, holder_host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                warn(f"taking over the unreadable lock {path}")
                path.unlink(missing_ok=True)
                continue
            if holder_host == host and pid == os.getpid():
                return path
            if holder_host == host and not _pid_alive(pid):
                warn(f"taking over the stale lock {path} of process {pid}, which no longer runs")
                path.unlink(missing_ok=True)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise ValueError(
                f"--output-dir {str(output_dir)!r} is in use by another run (pid {pid} on host "
                f"{holder_host}, since {since}; lock {path}): two runs in one folder would "
                "overwrite each other's checkpoints. Use another --output-dir, or delete "
                f"{path} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        atexit.register(_release, path, record)
        return path
    raise ValueError(f"could not take the lock {path}; another run keeps replacing it")
