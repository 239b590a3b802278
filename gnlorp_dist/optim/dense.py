"""One dense AdamW update of a block of rows (or a flat run) with its state dict.

Shared by the one-process/DDP path (row blocks of a dense tensor) and the ZeRO/FSDP2 paths
(flat runs): the moments live in ``state`` (float, or 8-bit on the tensor's block grid through
:class:`MomentStore`, updated chunk by chunk), the math is
:func:`gnlorp_dist.optim.functional.dense_adamw_step`, element-wise, so a chunk is updated alone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gnlorp_dist.optim.functional import dense_adamw_step
from gnlorp_dist.optim.quantized import MomentStore, SharedBlock
from gnlorp_dist.optim.spec import MomentSpec, StepHyperparameters


def update_dense_block(
    state: dict[str, Any],
    moments_spec: MomentSpec,
    hyper: StepHyperparameters,
    param_block: Tensor,
    grad_block: Tensor,
    *,
    param_numel: int | None = None,
    offset: int = 0,
) -> list[SharedBlock]:
    """``torch.optim.AdamW``'s update of ``param_block`` in place, counting steps in ``state``.

    ``param_numel``: the whole parameter's size when the block is a piece of it (decides 8-bit);
    ``offset``: the block's first element in the whole parameter (its place on the 8-bit grid).
    Returns the 8-bit blocks shared with another rank's piece, whose codes wait for
    :func:`gnlorp_dist.optim.block_grid.agree_shared_blocks`.
    """
    assert param_block.is_contiguous(), "dense blocks are updated through a flat view"
    moments = MomentStore(
        state,
        moments_spec.bits,
        param_numel=param_numel,
        offset=offset,
        min_numel=moments_spec.min_8bit_size,
    )
    state["step"] = int(state.get("step", 0)) + 1
    beta1, beta2 = hyper.betas
    weights, grads = param_block.view(-1), grad_block.reshape(-1)
    for start, stop, exp_avg, exp_avg_sq in moments.chunks(param_block):
        dense_adamw_step(
            weights[start:stop],
            grads[start:stop],
            exp_avg,
            exp_avg_sq,
            step=state["step"],
            lr=hyper.lr,
            beta1=beta1,
            beta2=beta2,
            eps=hyper.eps,
            weight_decay=hyper.weight_decay,
        )
    return moments.shared
