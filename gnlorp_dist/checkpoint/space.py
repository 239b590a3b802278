"""Disk space of a run's output folder: a full disk during a save, and what holds the space.

A save that runs out of space (``ENOSPC``, or a quota's ``EDQUOT``; torch and safetensors wrap
the ``OSError`` in their own exceptions, :func:`is_disk_full` looks through them) removes its
partial ``.tmp`` folder and stops with :class:`DiskFullError`, naming the numbers and the last
complete checkpoint, which stays. Partial folders a killed save left behind (checkpoints'
``*.tmp*``, ``final.tmp-<pid>``) are removed by :func:`remove_leftovers` when the next run
starts (it holds the folder's lock), and :func:`space_holders` lists what else fills the folder
when there still is not enough room.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How safetensors' Rust writer and torch's C++ writer word the same two errors.
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
_FINAL_TMP = re.compile(r"^final\.(?:old-)?tmp-(\d+)$")


class DiskFullError(RuntimeError):
    """The disk filled up while the run wrote a checkpoint or its final model; the message
    names the folder, the numbers, what was removed and what was kept."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` or an exception it was raised from or during is a full disk."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def human_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size); 0 for what vanished meanwhile."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for file in path.rglob("*"):
        try:
            total += file.stat().st_size if file.is_file() else 0
        except OSError:
            continue
    return total


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding ``path`` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full_error(
    tmp: Path, what: str, err: BaseException, *, kept: str, remove: bool
) -> DiskFullError:
    """The error of a save of ``what`` into ``tmp`` that filled the disk (``err``): ``tmp``
    removed first when ``remove`` (the rank that owns it), then the numbers measured; ``kept``
    says what stays (the last complete checkpoint)."""
    written = folder_bytes(tmp) if tmp.exists() else 0
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    free = free_bytes(tmp.parent)
    removed = (
        f"its partial folder {tmp} ({human_bytes(written)}) was removed"
        if remove
        else (
            f"its partial folder {tmp} ({human_bytes(written)}) is removed by rank 0 or the next run"
        )
    )
    return DiskFullError(
        f"disk full while writing {what} ({type(err).__name__}: {err}); {removed}, and "
        f"{kept}. {human_bytes(free)} is free there now. Free space on that disk, or move the "
        "output folder to a larger one, then run the same command again to resume"
    )


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale_final_tmps(output_dir: Path) -> list[Path]:
    """``final.tmp-<pid>`` / ``final.old-tmp-<pid>`` folders whose writer no longer runs (or is
    this process, which is about to write a fresh one)."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _FINAL_TMP.match(path.name)
        if match and path.is_dir():
            pid = int(match.group(1))
            if pid == os.getpid() or _pid_gone(pid):
                found.append(path)
    return sorted(found)


def remove_leftovers(output_dir: str | os.PathLike, checkpoints: Path) -> list[tuple[Path, int]]:
    """Remove the partial folders killed or failed saves left in ``output_dir`` (every
    ``*.tmp*`` folder under ``checkpoints``, stale final-model temporaries); ``(folder, bytes)``
    of each one removed. Call it only while holding the folder's lock (rank 0)."""
    candidates = stale_final_tmps(Path(output_dir))
    if checkpoints.is_dir():
        candidates += sorted(p for p in checkpoints.iterdir() if ".tmp" in p.name and p.is_dir())
    removed = []
    for path in candidates:
        size = folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append((path, size))
    return removed


def space_holders(output_dir: str | os.PathLike, limit: int = 6) -> str:
    """The largest entries of ``output_dir`` and of its checkpoint folders (every checkpoint
    of every branch, the final model, any partial folder), largest first, as one phrase."""
    root = Path(output_dir)
    if not root.is_dir():
        return "nothing"
    entries = []
    for path in root.iterdir():
        if path.is_dir() and path.name in ("checkpoints", "ds_checkpoints"):
            entries += [(folder_bytes(p), p) for p in path.iterdir()]
        else:
            entries.append((folder_bytes(path), path))
    entries = sorted((e for e in entries if e[0] > 0), key=lambda e: (-e[0], str(e[1])))
    shown = [f"{p.relative_to(root)} ({human_bytes(size)})" for size, p in entries[:limit]]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "nothing"
