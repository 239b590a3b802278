"""One dense AdamW update of a block of rows (or a flat run) with its state dict.

Shared by the one-process/DDP path (row blocks of a dense tensor) and the ZeRO/FSDP2 paths
(flat runs): the moments live in ``state`` (float, or 8-bit on the tensor's block grid through
:class:`MomentStore`, updated chunk by chunk), the math is
:func:`gnlorp_dist.optim.functional.dense_adamw_step`, element-wise, so a chunk is updated alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.functional import dense_adamw_step
from gnlorp_dist.optim.quantized import MOMENT_KEYS, MomentStore, SharedBlock
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
    A complex block is updated as its real view (``torch.optim.AdamW``'s rule: ``|g|^2`` in the
    second moment); a non-contiguous one (a transposed or channels_last tensor) through a
    row-major copy written back, with its moments in row-major order.
    Returns the 8-bit blocks shared with another rank's piece, whose codes wait for
    :func:`gnlorp_dist.optim.block_grid.agree_shared_blocks`.
    """
    if param_block.is_complex():
        param_block, grad_block = torch.view_as_real(param_block), _real_view(grad_block)
        param_numel = None if param_numel is None else 2 * param_numel
        offset *= 2
    weights = param_block if param_block.is_contiguous() else param_block.contiguous()
    _make_moments_row_major(state)
    moments = MomentStore(
        state,
        moments_spec.bits,
        param_numel=param_numel,
        offset=offset,
        min_numel=moments_spec.min_8bit_size,
    )
    state["step"] = int(state.get("step", 0)) + 1
    beta1, beta2 = hyper.betas
    flat, grads = weights.view(-1), grad_block.reshape(-1)
    for start, stop, exp_avg, exp_avg_sq in moments.chunks(weights):
        dense_adamw_step(
            flat[start:stop],
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
    if weights is not param_block:
        param_block.copy_(weights)
    return moments.shared


def _real_view(grad: Tensor) -> Tensor:
    """A complex gradient as real pairs (a real one, e.g. a loaded real-view state, unchanged)."""
    return torch.view_as_real(grad.resolve_conj()) if grad.is_complex() else grad


def _make_moments_row_major(state: dict[str, Any]) -> None:
    """Moments are read through flat views in the parameter's row-major order; a loaded state
    may keep another layout (``torch.optim.AdamW`` keeps a channels_last parameter's)."""
    for key in MOMENT_KEYS:
        moment = state.get(key)
        if isinstance(moment, Tensor):
            if moment.is_complex():  # torch.optim.AdamW's state of a complex parameter
                moment = torch.view_as_real(moment)
            state[key] = moment.contiguous()
