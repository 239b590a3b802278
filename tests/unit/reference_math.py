"""Whole-matrix references of the optimizer's math, for tests only.

The driver (:mod:`gnlorp_dist.optim.driver`) computes on runs of a matrix's elements (ZeRO
partitions, FSDP2 row blocks, owners' blocks), never on the whole matrix in one call; these are
the textbook forms of the same updates that tests compare it with. They are built from the
library's pure pieces (:mod:`gnlorp_dist.optim.functional`, :mod:`gnlorp_dist.optim.vlorp`)
wherever the driver uses the same piece, so a bitwise comparison stays meaningful.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gnlorp_dist.optim.functional import (
    apply_projected_update_,
    normalized_low_rank_update,
    scale_low_rank_direction_,
    update_moments_,
)
from gnlorp_dist.optim.projection import Side, compute_projection, project_back
from gnlorp_dist.optim.vlorp import check_granularity, factored_denominator_rows


def projected_adamw_step(
    param: Tensor,
    low_rank_grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    proj: Tensor,
    side: Side,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """One GaLore-convention AdamW update of the whole ``param`` from its projected gradient, in
    place (``galore_torch.GaLoreAdamW``): ``denom = sqrt(v) + eps``, both bias corrections in
    the step size, the update projected back and scaled, then decoupled weight decay.

    ``step`` is the 1-based count of updates including this one; ``exp_avg``/``exp_avg_sq``
    have ``low_rank_grad``'s shape and are updated in place.
    """
    update_moments_(exp_avg, exp_avg_sq, low_rank_grad, beta1, beta2)
    # 8-bit moments come back as float32: project back in the basis's dtype (bf16 runs).
    direction_low = normalized_low_rank_update(exp_avg, exp_avg_sq, eps).to(proj.dtype)
    scaled = scale_low_rank_direction_(
        direction_low, step=step, lr=lr, beta1=beta1, beta2=beta2, scale=scale
    )
    apply_projected_update_(
        param, project_back(scaled, proj, side), lr=lr, weight_decay=weight_decay
    )


def reshape_for_granularity(grad_MN: Tensor, c: int) -> Tensor:
    """``grad_MN`` as ``(M*c, N/c)``: row i becomes rows ``i*c .. i*c+c-1`` (row-major chunks)."""
    check_granularity(grad_MN.shape, c)
    rows, cols = grad_MN.shape
    return grad_MN.reshape(rows * c, cols // c)


def restore_shape(grad_LK: Tensor, shape: tuple[int, int] | torch.Size) -> Tensor:
    """Inverse of :func:`reshape_for_granularity`: the ``(M*c, N/c)`` tensor back as ``shape``."""
    assert grad_LK.numel() == shape[0] * shape[1], (tuple(grad_LK.shape), tuple(shape))
    return grad_LK.reshape(shape[0], shape[1])


def svd_basis(grad_MN: Tensor, rank: int, c: int, *, method: str = "svd") -> Tensor:
    """Orthonormal ``proj_RK``: top-``rank`` right singular vectors of the reshaped gradient."""
    return compute_projection(reshape_for_granularity(grad_MN, c), rank, "right", method=method)


def project_granular(grad_MN: Tensor, proj_RK: Tensor, c: int) -> Tensor:
    """Low-rank form ``(M*c, r)`` of ``grad_MN``: ``reshape(grad, c) @ proj_RK.T``."""
    return reshape_for_granularity(grad_MN, c) @ proj_RK.T


def project_back_granular(
    low_LR: Tensor,
    proj_RK: Tensor,
    c: int,
    shape: tuple[int, int] | torch.Size,
    *,
    random: bool,
) -> Tensor:
    """Full ``shape`` form of ``low_LR``: ``low @ proj_RK`` (``/ r`` if ``random``: ``E[P^T P]
    = r I`` for unit-variance entries), reshaped back."""
    check_granularity(shape, c)
    back_LK = low_LR @ proj_RK
    if random:
        back_LK = back_LK / proj_RK.shape[0]
    return restore_shape(back_LK, shape)


def square_sums(full_MN: Tensor) -> tuple[Tensor, Tensor]:
    """Row sums ``(M,)`` and column sums ``(N,)`` of ``full_MN ** 2`` (in >= float32), what
    :func:`gnlorp_dist.optim.vlorp.square_sums_low_rank` computes without the full matrix."""
    sq_MN = full_MN.to(torch.promote_types(full_MN.dtype, torch.float32)).square()
    return sq_MN.sum(dim=1), sq_MN.sum(dim=0)


def factored_denominator(
    row_M: Tensor, col_N: Tensor, step: int, beta2: float, eps: float
) -> Tensor:
    """Every row of :func:`gnlorp_dist.optim.vlorp.factored_denominator_rows`: ``sqrt(V^ / (1 -
    beta2**step)) + eps`` with ``V^ = R C^T / sum(R)`` (shape ``M x N``)."""
    return factored_denominator_rows(row_M, col_N, 0, row_M.shape[0], step, beta2, eps)


def projfactor_direction(
    exp_avg_LR: Tensor,
    proj_RK: Tensor,
    c: int,
    shape: tuple[int, int] | torch.Size,
    row_M: Tensor,
    col_N: Tensor,
    step: int,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    random: bool,
) -> Tensor:
    """ProjFactor's full-size direction ``back(m_t / (1 - beta1**step)) / denominator``.

    ``exp_avg_LR`` is the subspace first moment after this step's update, ``row_M``/``col_N``
    the statistics after ``factored_second_moment_update`` of this step; ``step`` is 1-based.
    The optimizer applies ``-lr * scale * direction``.
    """
    m_hat_LR = exp_avg_LR / (1 - beta1**step)
    back_MN = project_back_granular(m_hat_LR, proj_RK, c, shape, random=random)
    denom_MN = factored_denominator(row_M, col_N, step, beta2, eps)
    return (back_MN.to(denom_MN.dtype) / denom_MN).to(exp_avg_LR.dtype)
