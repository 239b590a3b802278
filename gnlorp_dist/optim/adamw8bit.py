"""``GradNormLoRPAdamW8bit``: the 8-bit spelling of :class:`GradNormLoRPAdamW`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from gnlorp_dist.optim.adamw import GradNormLoRPAdamW


class GradNormLoRPAdamW8bit(GradNormLoRPAdamW):
    """``GradNormLoRPAdamW(..., bits=8)``: block-wise 8-bit Adam moments."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> None:
        if "bits" in kwargs:
            raise ValueError(f"GradNormLoRPAdamW8bit takes no bits= (got {kwargs['bits']!r})")
        super().__init__(params, bits=8, **kwargs)
