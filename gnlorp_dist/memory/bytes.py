"""The byte model: what each kind of tensor a training step keeps costs, in bytes.

Every byte count in the project goes through this module: the estimator
(:mod:`gnlorp_dist.memory.arithmetic`), the checkpoint-size preflight
(:mod:`gnlorp_dist.training.preflight`), the live-tensor accounting
(:mod:`gnlorp_dist.memory.accounting`) and the benchmarks. Two halves:

- priced from shapes (nothing allocated): weights, gradients and float buffers
  (:func:`dense_bytes`), Adam's moments as floats or as 8-bit codes with one float32 scale a
  block (:func:`moment_bytes`, the 8-bit rule being
  :func:`gnlorp_dist.optim.quantized.stores_8bit`), ProjFactor's factored second moment
  (:func:`projected_moment_bytes`), projection bases as floats or INT8/INT4 codes with one
  float32 scale a group (:func:`basis_bytes`);
- read from a live optimizer: which state entry is which kind (:func:`entry_kind`) and the bytes
  of every kind (:func:`state_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.quantized import BLOCK_SIZE, MIN_8BIT_NUMEL, stores_8bit
from gnlorp_dist.optim.quantized_basis import PROJ_GROUP_SIZE

FLOAT_BASIS_BITS: tuple[int | None, ...] = (None, 16)
"""``proj_bits`` values that mean a float basis (the optimizer's ``None``; the estimator's 16)."""
TORCH_ADAMW_STEP_BYTES = 4
"""``torch.optim.AdamW`` keeps its step count as a float32 tensor per parameter."""

# -- priced from shapes ---------------------------------------------------------------------


def dense_bytes(numel: int, element_size: int) -> int:
    """A plain tensor: weights, gradients, float buffers, low-rank gradient sums."""
    return numel * element_size


def quantized_moment_bytes(numel: int) -> int:
    """One 8-bit moment: uint8 codes plus one float32 scale per :data:`BLOCK_SIZE` block."""
    return numel + 4 * math.ceil(numel / BLOCK_SIZE)


def moment_bytes(
    numel: int, bits: int, element_size: int, min_8bit_size: int = MIN_8BIT_NUMEL
) -> int:
    """Adam's two moments of ``numel`` elements: 8-bit codes and block scales where
    :func:`stores_8bit` says so, else floats of ``element_size`` bytes."""
    if stores_8bit(bits, numel, min_8bit_size):
        return 2 * quantized_moment_bytes(numel)
    return 2 * dense_bytes(numel, element_size)


def projected_moment_bytes(
    low_rank_numel: int,
    bits: int,
    element_size: int,
    *,
    factored_numel: int = 0,
    min_8bit_size: int = MIN_8BIT_NUMEL,
) -> int:
    """The moments of a projected matrix: Adam's two of the low-rank shape or, with ProjFactor
    (``factored_numel`` = rows + columns of the full matrix, else 0), the first alone and the
    second as float32 row and column sums."""
    moments = moment_bytes(low_rank_numel, bits, element_size, min_8bit_size)
    if factored_numel:
        return moments // 2 + 4 * factored_numel
    return moments


def basis_groups(shape: tuple[int, int]) -> tuple[int, int]:
    """(scales, padded elements) of a quantised basis of ``shape``: each row is cut into groups
    of ``min(PROJ_GROUP_SIZE, cols)`` values (the last one zero-padded), one float32 scale a
    group (:mod:`gnlorp_dist.optim.quantized_basis`)."""
    rows, cols = shape
    width = min(PROJ_GROUP_SIZE, cols)
    groups = -(-cols // width)
    return rows * groups, rows * groups * width


def basis_bytes(shape: tuple[int, int], proj_bits: int | None, element_size: int) -> int:
    """Bytes one basis keeps in the optimizer state: floats of ``element_size`` bytes (a float
    basis, :data:`FLOAT_BASIS_BITS`); int8 codes (8) or two INT4 codes a byte (4) plus one
    float32 scale a group."""
    numel = math.prod(shape)
    if proj_bits in FLOAT_BASIS_BITS:
        return dense_bytes(numel, element_size)
    if proj_bits not in (8, 4):
        raise ValueError(f"proj_bits={proj_bits!r} is not a basis width; use None, 8 or 4")
    scales, _ = basis_groups(shape)
    return (numel if proj_bits == 8 else -(-numel // 2)) + 4 * scales


# -- read from a live optimizer ------------------------------------------------------------

PROJECTION_KEYS = ("proj", "proj_scale", "projector")
"""State keys of a projection basis: ours (a float basis, or a quantised one's codes and
scales) and galore-torch's ``GaLoreProjector`` object."""
ACCUMULATION_KEY = "low_rank_grad_sum"
"""Per-layer mode's low-rank gradient sum (gradient accumulation)."""
MOMENT_PREFIX = "exp_avg"
"""Adam's moments (and, 8-bit, their block scales) start with this."""
STATE_KINDS = ("optimizer_states", "projection", "accumulation_buffers")
"""What a state entry is (:func:`entry_kind`); the accounting's component names."""


def entry_kind(key: str) -> str:
    """The kind (:data:`STATE_KINDS`) of the optimizer-state entry under ``key``."""
    if key in PROJECTION_KEYS:
        return "projection"
    if key == ACCUMULATION_KEY:
        return "accumulation_buffers"
    return "optimizer_states"


def entry_tensors(value: Any) -> list[Tensor]:
    """The tensors a state entry holds on this rank: a tensor (a DTensor's local shard), a
    galore-torch projector's bases, the contents of a container; numbers hold none."""
    if isinstance(value, Tensor):
        # A DTensor (FSDP2) answers nbytes for the global tensor; its local shard is this rank's.
        to_local = getattr(value, "to_local", None)
        return [to_local() if callable(to_local) else value]
    basis = getattr(value, "ortho_matrix", None)  # a galore-torch GaLoreProjector
    if basis is not None:
        return [
            b for b in (basis if isinstance(basis, (list, tuple)) else [basis]) if b is not None
        ]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in entry_tensors(v)]
    return []


def state_bytes(
    states: Iterable[dict[str, Any]], *, each_storage_once: bool = False
) -> dict[str, int]:
    """Bytes of the tensors in ``states`` (per-parameter optimizer states), by kind
    (:data:`STATE_KINDS`), of the optimizer states those of Adam's ``moments``, and the ``total``.

    A tensor counts its own bytes (a view its view's). ``each_storage_once``: every storage
    once and whole instead (a tensor shared by many states, such as bitsandbytes' quantisation
    map, counts once; galore-torch's basis counts the whole SVD factor it was sliced from)."""
    counts = dict.fromkeys((*STATE_KINDS, "moments", "total"), 0)
    seen: set[int] = set()
    for state in states:
        for key, value in state.items():
            for tensor in entry_tensors(value):
                nbytes = tensor.nbytes
                if each_storage_once:
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() in seen:
                        continue
                    seen.add(storage.data_ptr())
                    nbytes = storage.nbytes()
                counts[entry_kind(key)] += nbytes
                counts["moments"] += nbytes if key.startswith(MOMENT_PREFIX) else 0
                counts["total"] += nbytes
    return counts


def optimizer_state_bytes(
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor] | None = None,
    *,
    each_storage_once: bool = False,
) -> dict[str, int]:
    """:func:`state_bytes` of ``optimizer``'s per-parameter states (only ``params``'s if given)."""
    if params is None:
        states = [s for s in optimizer.state.values() if isinstance(s, dict)]
    else:
        states = [optimizer.state[p] for p in params if p in optimizer.state]
    return state_bytes(states, each_storage_once=each_storage_once)
