"""Rows of the GPU check: one per check, with a status, a line of figures and the raw data.

A section appends its rows to a :class:`Rows`, which rewrites its file after every append: a
section killed at its time limit still reports every row it finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


def row(check: str, status: str, figures: str = "", **data: Any) -> dict[str, Any]:
    assert status in (PASS, FAIL, SKIP), status
    return {"check": check, "status": status, "figures": figures, "data": data}


def section_status(rows: list[dict[str, Any]]) -> str:
    """FAIL if a row failed; SKIP if one was skipped (a skip never reads as a pass); else PASS.
    A section without rows failed: it proved nothing."""
    statuses = {r["status"] for r in rows}
    if FAIL in statuses or not rows:
        return FAIL
    return SKIP if SKIP in statuses else PASS


class Rows(list):
    """A list of rows kept on disk (JSON) after every append."""

    def __init__(self, path: Path | None = None, rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__(rows or [])
        self.path = path

    def append(self, item: dict[str, Any]) -> None:
        super().append(item)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(list(self), default=str))
            tmp.replace(self.path)  # a reader never sees half a file

    @classmethod
    def read(cls, path: Path) -> Rows:
        """The rows a worker left in ``path`` (none if it wrote nothing)."""
        if not path.exists():
            return cls()
        return cls(rows=json.loads(path.read_text()))


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else float("nan")
