"""Where a run computes: the ``--device``, ``--autocast`` and ``--tf32`` flags of every CLI.

One place turns the user's words into a ``torch.device`` and prepares it, so ``gnlorp-train``,
``gnlorp-finetune`` and ``gnlorp-bench`` agree:

- ``auto``: ``cuda:<LOCAL_RANK>`` when torch sees a CUDA device, else the CPU;
- ``cpu``: the CPU, even on a GPU host (the process group is then gloo);
- ``cuda`` / ``cuda:N``: that GPU (``cuda`` alone means this process's ``LOCAL_RANK``); a clear
  error naming the flag when torch sees no CUDA device.

:func:`activate_device` calls ``torch.cuda.set_device`` before anything allocates on the GPU (a
process that allocates first on ``cuda:0`` leaves a context there on every rank) and sets the
TF32 matmul mode. Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

DEVICES = ("auto", "cpu", "cuda")
AUTOCAST_DTYPES = ("none", "bf16")
"""``--autocast`` choices: none (compute in the weights' dtype) or bf16 (fp32 master weights, bf16
matmuls under ``torch.autocast``)."""


def local_rank_from_env() -> int:
    """This process's rank on its machine, as launchers export it (0 when alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(
    name: str, local_rank: int | None = None, flag: str = "--device"
) -> torch.device:
    """The ``torch.device`` that ``--device name`` means for the process of ``local_rank``.

    Raises ValueError naming ``flag`` for an unknown name or a CUDA device torch cannot see.
    """
    if local_rank is None:
        local_rank = local_rank_from_env()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"{flag} {name}, but torch sees no CUDA device (torch.cuda.is_available() is "
                f"False, torch {torch.__version__}); use {flag} cpu, or {flag} auto to take a GPU "
                "only when there is one"
            )
        index = local_rank if name == "cuda" else _cuda_index(name, flag)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {name} asks for GPU {index} but this host has "
                f"{torch.cuda.device_count()}; launch at most that many processes per node"
            )
        return torch.device("cuda", index)
    raise ValueError(
        f"{flag} {name!r} is not a device; use one of {', '.join(DEVICES)} (or cuda:N)"
    )


def _cuda_index(name: str, flag: str) -> int:
    suffix = name.split(":", 1)[1]
    if not suffix.isdigit():
        raise ValueError(f"{flag} {name!r}: the GPU index after 'cuda:' must be a number")
    return int(suffix)


def activate_device(device: torch.device, *, tf32: bool = True) -> None:
    """Make ``device`` this process's current GPU (before any CUDA allocation) and set TF32.

    TF32 matmuls (Ampere and newer) are on by default, as in most training stacks; ``tf32=False``
    keeps full fp32 matmuls. A CPU device changes nothing.
    """
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def check_autocast(autocast: str, dtype: str, flag: str = "--autocast") -> None:
    """Refuse an autocast setting that cannot be honoured, naming the fix."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"{flag} {autocast!r}: use one of {', '.join(AUTOCAST_DTYPES)}")
    if autocast != "none" and dtype != "fp32":
        raise ValueError(
            f"{flag} {autocast} keeps fp32 master weights and computes in bf16, but --dtype is "
            f"{dtype} (pure {dtype} weights); use --dtype fp32 --autocast {autocast}, or --dtype "
            f"{dtype} alone"
        )


def autocast_context(device: torch.device, autocast: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``--autocast bf16`` on ``device``; a no-op for ``none``."""
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` on ``device``: through pinned host memory and without blocking on a GPU."""
    if batch.device == device:
        return batch
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def memory_stats(device: torch.device) -> dict[str, int]:
    """Peak bytes the CUDA caching allocator handed out and reserved on ``device`` (empty on
    a CPU)."""
    if device.type != "cuda":
        return {}
    return {
        "max_memory_allocated": torch.cuda.max_memory_allocated(device),
        "max_memory_reserved": torch.cuda.max_memory_reserved(device),
    }


def describe_memory(stats: dict[str, Any]) -> str:
    """``peak 12.34 GiB allocated / 13.00 GiB reserved`` (empty when there are no stats)."""
    if not stats:
        return ""
    gib = 1024**3
    return (
        f"peak {stats['max_memory_allocated'] / gib:.2f} GiB allocated / "
        f"{stats['max_memory_reserved'] / gib:.2f} GiB reserved"
    )
