"""Branches of a checkpoint folder (``checkpoints/`` or DeepSpeed's ``ds_checkpoints/``).

A run that resumes from a checkpoint other than its branch's head starts a new branch, recorded
in ``<root>/branch.json`` (``{"branch": id, "parent": the checkpoint it started from}``). The
first branch, "main", names its folders ``step-XXXXXXXX``; another branch ``step-XXXXXXXX-<id>``.
Pruning and ``--resume auto`` only look at the current branch (then at its parent), so an older
branch is never deleted by, nor confused with, a newer one's step numbers.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gnlorp_dist.checkpoint.manifest import read_json

MAIN_BRANCH = "main"
BRANCH_FILE = "branch.json"
STEP_DIR = re.compile(r"^step-(\d{8})(?:-(b[0-9a-f]+))?$")

IsComplete = Callable[[Path], bool]


def step_dir_name(step: int, branch: str = MAIN_BRANCH) -> str:
    return f"step-{step:08d}" + ("" if branch == MAIN_BRANCH else f"-{branch}")


def read_branch(root: Path) -> dict[str, Any]:
    """``root/branch.json``, or the main branch without parent when there is none."""
    path = root / BRANCH_FILE
    if not path.is_file():
        return {"branch": MAIN_BRANCH, "parent": None}
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("branch"), str):
        raise ValueError(f"{path} is not a branch record; delete it to continue the main branch")
    return record


def step_folders(root: Path, is_complete: IsComplete) -> list[tuple[int, str, Path]]:
    """``(step, branch, folder)`` of every complete folder of every branch, by step."""
    if not root.is_dir():
        return []
    return sorted(
        (int(match.group(1)), match.group(2) or MAIN_BRANCH, path)
        for path in root.iterdir()
        if (match := STEP_DIR.match(path.name)) and is_complete(path)
    )


def branch_folders(root: Path, is_complete: IsComplete, branch: str | None = None) -> list[Path]:
    """The complete folders of ``branch`` (default: the current one), oldest first."""
    branch = branch or read_branch(root)["branch"]
    return [path for _step, b, path in step_folders(root, is_complete) if b == branch]


def resume_candidates(root: Path, is_complete: IsComplete) -> list[Path]:
    """The current branch's folders, newest first, then the one the branch started from."""
    found = branch_folders(root, is_complete)[::-1]
    parent = read_branch(root).get("parent")
    if parent and Path(parent).is_dir() and Path(parent) not in found:
        found.append(Path(parent))
    return found


def begin_branch_if_needed(root: Path, resumed: Path, is_complete: IsComplete) -> str | None:
    """After resuming ``resumed`` (rank 0): a new branch unless ``resumed`` is the current
    branch's head (its newest folder, or the one it started from) or ``root`` holds nothing.
    The new branch id, or None when the current branch continues."""
    found = branch_folders(root, is_complete)
    head = found[-1] if found else read_branch(root).get("parent")
    if head is None and not step_folders(root, is_complete):
        return None  # a fresh folder: its first branch starts here
    if head is not None and Path(head).resolve() == Path(resumed).resolve():
        return None
    branch = f"b{secrets.token_hex(4)}"
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f"{BRANCH_FILE}.tmp-{os.getpid()}"
    with temporary.open("w") as f:
        json.dump({"branch": branch, "parent": str(Path(resumed).resolve())}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, root / BRANCH_FILE)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return branch
