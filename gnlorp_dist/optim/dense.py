"""One dense AdamW update of a block of rows (or a flat run) with its state dict.

Shared by the one-process/DDP path (row blocks of a dense tensor) and the ZeRO path (flat runs):
the moments live in ``state`` (float or 8-bit through :class:`MomentStore`), the math is
:func:`gnlorp_dist.optim.functional.dense_adamw_step`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gnlorp_dist.optim.functional import dense_adamw_step
from gnlorp_dist.optim.quantized import MomentStore


def update_dense_block(
    state: dict[str, Any],
    group: dict[str, Any],
    param_block: Tensor,
    grad_block: Tensor,
    *,
    param_numel: int | None = None,
) -> None:
    """``torch.optim.AdamW``'s update of ``param_block`` in place, counting steps in ``state``.

    ``param_numel``: the whole parameter's size when the block is a piece of it (decides 8-bit).
    """
    moments = MomentStore(state, group["bits"], param_numel=param_numel)
    state["step"] = int(state.get("step", 0)) + 1
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = moments.load_or_initialise(param_block)
    dense_adamw_step(
        param_block,
        grad_block,
        exp_avg,
        exp_avg_sq,
        step=state["step"],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
    )
    moments.store(exp_avg, exp_avg_sq)
