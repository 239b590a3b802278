"""Block-wise 8-bit optimizer moments (bitsandbytes' dynamic quantisation).

A quantised moment is two plain tensors kept in the optimizer state: ``<key>`` holds uint8
codes of the moment's shape, ``<key>_absmax`` one float32 scale per block of
:data:`BLOCK_SIZE` elements. Plain tensors keep ``state_dict()`` loadable with
``torch.load(weights_only=True)``.

The update functions never see the codes: :class:`MomentStore` hands them a float tensor and
writes it back, so the Adam math is the same code at 8 and 32 bits (the torchao pattern).
The first moment uses the signed dynamic map, the second (non-negative) the unsigned one, as
bitsandbytes' own 8-bit optimizers do. Tensors smaller than :data:`MIN_8BIT_NUMEL` stay in
float32: their codes would save nothing next to the block scales.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

BLOCK_SIZE = 256
MIN_8BIT_NUMEL = 4096
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


@functools.cache
def _dynamic_map(signed: bool, device: str) -> Tensor:
    import bitsandbytes.functional as bnbf  # noqa: PLC0415  (4 s import; only for 8-bit runs)

    # bitsandbytes builds the map on the default device; build it on the host (256 values, once
    # per device) and move it where the moments live.
    with torch.device("cpu"):
        dynamic_map = bnbf.create_dynamic_map(signed=signed)
    return dynamic_map.to(device)


def quantize_8bit(value: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes_uint8, absmax_f32)`` of ``value`` with block-wise dynamic quantisation."""
    import bitsandbytes.functional as bnbf  # noqa: PLC0415

    code = _dynamic_map(signed, str(value.device))
    codes, quant_state = bnbf.quantize_blockwise(
        value.float().contiguous(), code=code, blocksize=BLOCK_SIZE
    )
    return codes, quant_state.absmax.float()


def dequantize_8bit(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """Float32 tensor of ``codes``' shape from its codes and block scales."""
    import bitsandbytes.functional as bnbf  # noqa: PLC0415

    code = _dynamic_map(signed, str(codes.device))
    return bnbf.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK_SIZE)


class MomentStore:
    """Adam's two moments of one parameter, in float (32-bit mode) or 8-bit codes.

    ``load()`` returns float tensors to update in place; ``store()`` writes them back (a no-op
    for float state, a re-quantisation for 8-bit state).
    """

    def __init__(self, state: dict[str, Any], bits: int, param_numel: int | None = None) -> None:
        assert bits in (8, 32), bits
        self.state = state
        self.bits = bits
        self.param_numel = param_numel
        """The whole parameter's size when these moments are a run of it (ZeRO): whether they
        are 8-bit is decided by the parameter, as on one process, not by the run."""

    def initialise(self, like: Tensor) -> None:
        for key in MOMENT_KEYS:
            zeros = torch.zeros_like(like, memory_format=torch.preserve_format)
            self.state[key] = zeros
            if self._quantised(like):
                self.state[key], self.state[f"{key}_absmax"] = quantize_8bit(
                    zeros, signed=key == "exp_avg"
                )

    def load_or_initialise(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The moments as float tensors to update in place, created as zeros shaped ``like``
        the first time."""
        if "exp_avg" not in self.state:
            self.initialise(like)
        assert self.state["exp_avg"].shape == like.shape, (self.state["exp_avg"].shape, like.shape)
        return self.load()

    def load(self) -> tuple[Tensor, Tensor]:
        values = []
        for key in MOMENT_KEYS:
            if f"{key}_absmax" in self.state:
                values.append(
                    dequantize_8bit(
                        self.state[key], self.state[f"{key}_absmax"], signed=key == "exp_avg"
                    )
                )
            else:
                values.append(self.state[key])
        return values[0], values[1]

    def store(self, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        for key, value in zip(MOMENT_KEYS, (exp_avg, exp_avg_sq)):
            if f"{key}_absmax" in self.state:
                codes, absmax = quantize_8bit(value, signed=key == "exp_avg")
                self.state[key].copy_(codes)
                self.state[f"{key}_absmax"].copy_(absmax)

    def set_values(self, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        """Create the moments holding these values (quantised if 8-bit): a loaded or resharded
        state, as a step would have built it."""
        self.initialise(exp_avg)
        if "exp_avg_absmax" in self.state:
            self.store(exp_avg, exp_avg_sq)
        else:
            self.state["exp_avg"].copy_(exp_avg)
            self.state["exp_avg_sq"].copy_(exp_avg_sq)

    def _quantised(self, like: Tensor) -> bool:
        numel = self.param_numel if self.param_numel is not None else like.numel()
        return self.bits == 8 and numel >= MIN_8BIT_NUMEL


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes held by one parameter's optimizer state (every tensor in it)."""
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
