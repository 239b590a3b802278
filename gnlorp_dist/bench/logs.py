"""The text log (stdout and a file) and optional TensorBoard events of a benchmark run."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, TextIO

TENSORBOARD_HINT = "pip install tensorboard (or: pip install 'gnlorp-dist[tensorboard]')"


def tensorboard_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``; a clean ModuleNotFoundError if it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises ImportError when the tensorboard package is absent
        raise ModuleNotFoundError(
            f"--tensorboard needs the tensorboard package, which is not importable ({err}); "
            f"{TENSORBOARD_HINT}, or drop --tensorboard",
            name="tensorboard",
        ) from err
    return SummaryWriter


def _run_folder(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


class RunLogger:
    """One line per method every ``log_every`` steps, to ``stream`` and to ``log_path``; with
    ``tensorboard_dir`` also scalars per method (one event folder each, so TensorBoard overlays
    the methods): ``train/loss``, ``train/lr``, ``train/step_seconds`` at every step and the
    final metrics under ``final/``."""

    def __init__(
        self,
        log_path: Path,
        log_every: int,
        tensorboard_dir: Path | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.log_every = log_every
        self.stream = stream or sys.stdout
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = log_path.open("w", encoding="utf-8")
        self.tensorboard_dir = tensorboard_dir
        self._writer_class = tensorboard_writer_class() if tensorboard_dir else None
        self._writers: dict[str, Any] = {}

    def line(self, message: str) -> None:
        print(message, file=self.stream, flush=True)
        self.file.write(message + "\n")
        self.file.flush()

    def _writer(self, label: str) -> Any:
        if self._writer_class is None:
            return None
        if label not in self._writers:
            folder = Path(self.tensorboard_dir or ".") / _run_folder(label)  # type: ignore[arg-type]
            self._writers[label] = self._writer_class(log_dir=str(folder))
        return self._writers[label]

    def step(
        self,
        label: str,
        step: int,
        total: int,
        losses: list[float],
        seconds: list[float],
        lr: float,
    ) -> None:
        """Record step ``step`` of ``label`` (``losses``/``seconds``: every step so far)."""
        writer = self._writer(label)
        if writer is not None:
            writer.add_scalar("train/loss", losses[-1], step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/step_seconds", seconds[-1], step)
            writer.add_scalar("train/loss_vs_wall_ms", losses[-1], int(sum(seconds) * 1e3))
        if step % self.log_every and step != total:
            return
        window = step % self.log_every or self.log_every
        loss = sum(losses[-window:]) / window
        per_step = sum(seconds[-window:]) / window
        self.line(
            f"step {step:>5}/{total} | {label:<20} | loss {loss:.4f} (mean of last {window}) | "
            f"lr {lr:.2e} | {per_step:.3f} s/step | {sum(seconds):.1f} s"
        )

    def final(self, label: str, metrics: dict[str, float]) -> None:
        writer = self._writer(label)
        if writer is None:
            return
        for name, value in metrics.items():
            if value is not None and math.isfinite(value):
                writer.add_scalar(f"final/{name}", value, 0)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.flush()
            writer.close()
        self._writers.clear()
        self.file.close()
