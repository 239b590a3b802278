"""Checks before the first training step: is there somewhere to write the checkpoints?

A run that cannot save should fail before it computes, not at its first save ``--save-every``
steps later. :func:`check_output_dir` creates the output folder and proves it writable with a
probe file; :func:`check_free_space` compares its free space with what the run will write
(:func:`run_writes`: a checkpoint, :func:`checkpoint_bytes_estimate`, only if it trains; the
merged model, :func:`merged_model_bytes_estimate`), checked by the training loop itself.

Every rank runs the checks (``gnlorp-train`` calls them from
:func:`gnlorp_dist.training.setup.prepare`): every rank writes its optimizer shard into the same
checkpoint folder, and all ranks compute the same estimate and see the same file system, so
they fail together instead of one rank raising while the others wait in a collective.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from gnlorp_dist.checkpoint.space import human_bytes as _size
from gnlorp_dist.memory.bytes import (
    basis_bytes,
    dense_bytes,
    moment_bytes,
    projected_moment_bytes,
)
from gnlorp_dist.optim import GradNormLoRPAdamW
from gnlorp_dist.optim.projector import state_layout
from gnlorp_dist.optim.quantized import MIN_8BIT_NUMEL

if TYPE_CHECKING:
    from transformers import LlamaConfig

SPACE_MARGIN = 0.10
"""Extra free space asked for beyond the estimate (a fraction of it)..."""
SPACE_MARGIN_BYTES = 16 << 20
"""... plus this many bytes (metadata, the scheduler, RNG states, the JSON files)."""


def check_output_dir(path: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """``path`` created if missing (with its parents), checked writable by creating and removing
    a probe file and, when ``needed_bytes`` is given, by :func:`check_free_space`. Returns the
    folder.

    Raises ValueError naming the path, the numbers and the fix: a path that is a file, a parent
    that is a file or cannot be created, a folder that cannot be written, too little space.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"--output-dir {str(path)!r} is a file, not a folder; pass a folder (it is created "
            "if missing)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"--output-dir {str(path)!r} cannot be created ({err.strerror or err}): a parent is "
            "a file or not writable; pass a folder you can write to"
        ) from None
    probe = folder / f".gnlorp-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"gnlorp")
    except OSError as err:
        raise ValueError(
            f"--output-dir {str(path)!r} is not writable ({err.strerror or err}); checkpoints "
            "could not be saved. Fix its permissions or pass another --output-dir"
        ) from None
    finally:
        probe.unlink(missing_ok=True)
    if needed_bytes:
        check_free_space(folder, needed_bytes)
    return folder


class NotEnoughSpace(ValueError):
    """Too little free space for what the run will write (a user mistake: a ValueError)."""


def check_free_space(path: str | os.PathLike, needed: int | dict[str, int]) -> None:
    """:class:`NotEnoughSpace` naming the numbers unless the existing folder ``path`` has
    ``needed`` bytes free plus a margin (:data:`SPACE_MARGIN`, :data:`SPACE_MARGIN_BYTES`).
    ``needed``: one checkpoint's bytes, or the bytes of each thing the run writes, by name
    (e.g. ``{"one checkpoint": ..., "the merged model": ...}``); nothing to write: no check."""
    parts = {"one checkpoint": needed} if isinstance(needed, int) else dict(needed)
    parts = {what: size for what, size in parts.items() if size > 0}
    if not parts:
        return
    needed_bytes = sum(parts.values())
    wanted = int(needed_bytes * (1 + SPACE_MARGIN)) + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(path).free
    if free < wanted:
        items = [f"{what} about {_size(size)}" for what, size in parts.items()]
        first, *rest = items
        listed = first.replace(" about ", " needs about ", 1) + "".join(f" and {r}" for r in rest)
        total = f"{_size(needed_bytes)} in all; " if rest else ""
        raise NotEnoughSpace(
            f"--output-dir {str(path)!r} has {_size(free)} free but {listed} (estimated from "
            f"the model and optimizer state; {total}{_size(wanted)} with the margin). Free "
            "space there or pass an --output-dir on a larger disk"
        )


def run_writes(
    *, checkpoint_bytes: int, merged_bytes: int, start_step: int, max_steps: int
) -> dict[str, int]:
    """What a ``gnlorp-train`` run from ``start_step`` writes to its output folder, by name.

    A run that trains at all saves a checkpoint at ``max_steps`` (and every ``--save-every``
    steps before; older ones are pruned to ``--keep-checkpoints``, and the ones already on disk
    are in the used space): one more checkpoint. Rank 0 then writes the merged model, which
    stays beside the last checkpoint. ``prepare()`` alone (a caller with its own loop, like the
    GPU check) writes neither and is not checked."""
    writes = {}
    if start_step < max_steps:
        writes["one checkpoint"] = checkpoint_bytes
    writes["the merged model"] = merged_bytes
    return writes


def merged_model_bytes_estimate(llama: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes of the merged model's weights: the plain architecture (weight norm merged away, a
    tied embedding once) in ``dtype``, measured on a meta-device model (no memory)."""
    from gnlorp_dist.models import build_model_on_meta  # noqa: PLC0415  (imports transformers)

    model = build_model_on_meta(llama)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return dense_bytes(tensor.numel(), tensor.element_size())


def _gnlorp_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The state GradNormLoRPAdamW will keep, priced by :mod:`gnlorp_dist.memory.bytes` from
    its groups: the group's ``bits`` and ``min_8bit_size`` decide 8-bit moments."""
    total = 0
    for group in optimizer.param_groups:
        rank, bits = group.get("rank"), group.get("bits", 32)
        min_numel = group.get("min_8bit_size", MIN_8BIT_NUMEL)
        for param in group["params"]:
            size = param.element_size()
            if rank is None or param.dim() != 2:
                total += moment_bytes(param.numel(), bits, size, min_numel)
                continue
            # VLoRP's projected shape, random bases (none stored), ProjFactor's factored v.
            low_rank, shape, factored = state_layout(tuple(param.shape), group)
            total += projected_moment_bytes(
                low_rank, bits, size, factored_numel=factored, min_8bit_size=min_numel
            )
            if shape is not None:
                # The projection basis: floats, or INT8 / INT4 codes and their scales (proj_bits).
                total += basis_bytes(shape, group.get("proj_bits"), size)
    return total


def checkpoint_bytes_estimate(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """An ESTIMATE of the bytes one checkpoint of ``model`` and ``optimizer`` takes on disk, all
    ranks' shards together: the model's state dict plus the optimizer state.

    The optimizer state is computed from the parameter groups, not read from the state (which is
    empty before the first step): for GradNormLoRPAdamW the two Adam moments of each parameter
    (low-rank for a projected one, 8-bit codes and block scales when ``bits=8``) and each
    projection basis (codes and scales under ``proj_bits``); for any other optimizer two float
    moments the size of every parameter (Adam). Scalars, JSON files and the file formats' headers are left to the caller's margin.
    """
    model_bytes = sum(_tensor_bytes(t) for t in model.state_dict().values() if torch.is_tensor(t))
    if isinstance(optimizer, GradNormLoRPAdamW):
        state = _gnlorp_state_bytes(optimizer)
    else:
        state = sum(
            moment_bytes(param.numel(), 32, param.element_size())
            for group in optimizer.param_groups
            for param in group["params"]
        )
    return model_bytes + state
