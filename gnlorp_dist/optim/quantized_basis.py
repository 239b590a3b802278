"""Projection bases kept as INT8 or INT4 codes (``proj_bits=8|4``), restored on use.

Q-GaLore keeps its projection matrices in INT4 to save the memory of the bases (on LLaMA 7B at
rank 1024 the bf16 bases are 1.75 GiB, as much as half the 8-bit moments). Here a basis of shape
``(R, C)`` is cut along its last dimension into groups of :data:`PROJ_GROUP_SIZE` values (the
whole row when ``C`` is smaller), each with one float32 scale ``absmax / qmax``; the values are
rounded to the nearest integer in ``[-qmax, qmax]`` (symmetric: an orthonormal basis has no
offset), ``qmax = 127`` (INT8, ``int8`` codes of the basis's shape) or ``7`` (INT4, two codes per
byte along the last dimension, ``uint8`` of shape ``(R, C / 2)``, so ``C`` must be even).

State keys: ``proj`` holds the codes and ``proj_scale`` the scales; a float basis (the default,
``proj_bits=None``) is ``proj`` alone, as before. :func:`load_basis` is the only reader: the
driver restores one matrix's basis at a time, in the dtype it computes in, and drops it after
the update. The quality kept is measured as the gradient energy the restored basis captures
against the float basis's (``benchmarks/quantized_projection.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

PROJ_GROUP_SIZE = 128
PROJ_BITS: tuple[int | None, ...] = (None, 8, 4)
_QMAX = {8: 127, 4: 7}


def _group_width(cols: int) -> int:
    return min(PROJ_GROUP_SIZE, cols)


def _grouped(values_RC: Tensor) -> Tensor:
    """``(R, groups, width)`` view of ``values_RC`` zero-padded to whole groups."""
    rows, cols = values_RC.shape
    width = _group_width(cols)
    groups = -(-cols // width)
    if groups * width != cols:
        values_RC = torch.nn.functional.pad(values_RC, (0, groups * width - cols))
    return values_RC.reshape(rows, groups, width)


def quantize_basis(basis_RC: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(codes, scales)`` of a 2-D basis at ``bits`` (8: int8 ``(R, C)``; 4: uint8
    ``(R, C / 2)``, two codes per byte, the even column in the low nibble)."""
    assert basis_RC.dim() == 2 and bits in _QMAX, (basis_RC.shape, bits)
    rows, cols = basis_RC.shape
    qmax = _QMAX[bits]
    grouped = _grouped(basis_RC.float())
    absmax = grouped.abs().amax(dim=2)
    scales = absmax / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(grouped / safe[:, :, None]).clamp_(-qmax, qmax)
    codes = codes.reshape(rows, -1)[:, :cols]
    if bits == 8:
        return codes.to(torch.int8), scales
    assert cols % 2 == 0, f"INT4 bases pack two values per byte: {cols} columns is odd"
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def dequantize_basis(codes: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The basis restored from its codes and scales, in ``dtype``."""
    if codes.dtype == torch.uint8:  # INT4, packed
        low = (codes & 0xF).to(torch.int8) - 8
        high = (codes >> 4).to(torch.int8) - 8
        values = torch.stack((low, high), dim=2).reshape(codes.shape[0], -1)
    else:
        values = codes
    cols = values.shape[1]
    grouped = _grouped(values.float())
    restored = (grouped * scales[:, :, None]).reshape(values.shape[0], -1)[:, :cols]
    return restored.to(dtype)


def store_basis(state: dict[str, Any], basis: Tensor, bits: int | None) -> None:
    """Keep ``basis`` in ``state`` (replacing the previous one), quantised if ``bits`` is set."""
    if bits is None:
        state["proj"] = basis
        state.pop("proj_scale", None)
        return
    state["proj"], state["proj_scale"] = quantize_basis(basis, bits)


def load_basis(state: dict[str, Any], dtype: torch.dtype) -> Tensor:
    """The basis in ``state``: a float basis as stored; a quantised one restored in ``dtype``
    (the dtype it was computed in: the gradient's, or float32 where ranks assembled it)."""
    if "proj_scale" not in state:
        return state["proj"]
    return dequantize_basis(state["proj"], state["proj_scale"], dtype)


def drop_basis(state: dict[str, Any]) -> None:
    state.pop("proj", None)
    state.pop("proj_scale", None)


def basis_state(state: dict[str, Any]) -> dict[str, Tensor]:
    """The entries of ``state`` that hold its basis (to copy it elsewhere)."""
    return {key: state[key] for key in ("proj", "proj_scale") if key in state}


def stored_shape(shape: tuple[int, int], bits: int | None) -> tuple[int, int]:
    """The shape of ``proj`` in a state for a basis of ``shape`` stored at ``bits``."""
    return (shape[0], shape[1] // 2) if bits == 4 else shape
