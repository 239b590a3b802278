"""VLoRP (various-grained low-rank projection) and ProjFactor: the pure functions the driver runs.

VLoRP (Wang et al. 2025, arXiv 2505.01744) adds a second knob beside the rank ``r``: the
projection granularity ``c``. A gradient ``grad_MN`` (M rows, N columns) is reshaped row-major to
``(M*c, N/c)`` (each row of G splits into ``c`` consecutive chunks of ``K = N/c`` columns) and is
projected on the RIGHT, exactly like ``projection.py``'s right side:

- basis ``proj_RK`` (``r x K``, the same convention as ``projection.proj_RN``);
- ``low_LR = reshape(grad_MN, c) @ proj_RK.T`` with ``L = M*c`` (shape ``M*c x r``);
- back: ``(low_LR @ proj_RK / s)`` reshaped to ``(M, N)``, with ``s = r`` for a random basis
  and ``s = 1`` for an orthonormal (SVD) basis.

The optimizer state per matrix is ``M*c x r``: the memory budget is ``c*r`` values per row. The
reshape itself is :func:`gnlorp_dist.optim.projector.projected_shape` (a row-major reshape keeps
every flat index, so the driver projects runs of the reshaped matrix with
:mod:`gnlorp_dist.optim.projection`); this module holds what is VLoRP's own: the
granularity rule, the seeded random bases, and ProjFactor's second moment.

Random bases have i.i.d. entries of mean 0 and variance 1 (N(0, 1) or Rademacher +-1), so
``E[proj_RK.T @ proj_RK] = r * I_K`` and the back-projection ``G P^T P / r`` is an unbiased
estimator of G. They are drawn on the device that uses them, by a ``torch.Generator`` of that
device seeded with ``window_seed``: no host RNG and no host-to-device copy, and the basis is never
stored, only the seed. The same seed gives bitwise the same basis on the same kind of device
(every CPU; every GPU of one model: CUDA's draw of a large tensor depends on the GPU's number of
SMs), and a different one on another (CPU and CUDA generators are different streams).

ProjFactor keeps the first moment in the subspace (``M*c x r``) and the second moment
Adafactor-style as ``M + N`` running row/column sums of the squared back-projected gradient of
the ORIGINAL ``M x N`` shape (see ``factored_second_moment_update``).

tests/unit/reference_math.py holds the whole-matrix forms (granular projection and back-projection,
the full denominator, ProjFactor's direction) that the tests check these and the driver against.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

BasisKind = Literal["gaussian", "rademacher"]
BASIS_KINDS: tuple[str, ...] = ("gaussian", "rademacher")

_MASK64 = (1 << 64) - 1


def check_granularity(shape: tuple[int, int] | torch.Size, granularity: int) -> None:
    """Raise ``ValueError`` unless ``granularity`` (c) is a positive int dividing the columns m."""
    if len(shape) != 2:
        raise ValueError(f"VLoRP needs a 2-D gradient, got shape {tuple(shape)}")
    rows, cols = shape
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity c={granularity!r} must be a positive integer")
    if cols % granularity != 0:
        raise ValueError(
            f"granularity c={granularity} must divide the number of columns m={cols} "
            f"of the {rows} x {cols} gradient"
        )


def random_basis(
    rows: int,
    rank: int,
    *,
    seed: int,
    kind: BasisKind = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random basis ``proj_RK`` of shape ``(rank, rows)``, ``rows`` = K = N/c (right side).

    ``rows`` is the row length of the reshaped gradient (its number of columns). Entries are
    i.i.d. N(0, 1) or +-1, drawn in float32 on ``device`` by a generator of that device seeded
    with ``seed`` (no host RNG, no copy), then cast to ``dtype``: a lower-precision request is
    the float32 draw rounded. The same seed gives bitwise the same basis on the same kind of
    device (see the module docstring); CPU and CUDA draws differ. Not orthonormal: back-project
    with ``random=True`` (divides by ``rank``).
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    if kind == "gaussian":
        basis_RK = torch.randn(rank, rows, generator=generator, dtype=torch.float32, device=device)
    elif kind == "rademacher":
        bits = torch.randint(
            0, 2, (rank, rows), generator=generator, dtype=torch.int64, device=device
        )
        basis_RK = (bits * 2 - 1).to(torch.float32)
    else:
        raise ValueError(f"basis kind {kind!r} is not supported; use one of {BASIS_KINDS}")
    return basis_RK.to(dtype=dtype)


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser (Steele et al. 2014): a bijective, well-mixed 64-bit hash; Python's
    # hash() is salted per process, which would give each rank a different basis.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def window_seed(base_seed: int, param_index: int, step: int, update_proj_gap: int) -> int:
    """Seed of the refresh window containing ``step`` for parameter ``param_index``.

    ``step`` counts the updates already taken (0-based, the driver's ``state["step"]`` before its
    increment, whose refresh rule is ``step % update_proj_gap == 0``): window ``step // gap``.
    The result is the same for every micro-batch and rank in the window, differs across windows
    and parameters, and lies in ``[0, 2**63)`` (accepted by ``Generator.manual_seed``).
    """
    if update_proj_gap < 1 or step < 0 or param_index < 0:
        raise ValueError(
            f"window_seed needs update_proj_gap >= 1, step >= 0 and param_index >= 0; got "
            f"{update_proj_gap}, {step}, {param_index}"
        )
    x = _splitmix64(int(base_seed) & _MASK64)
    x = _splitmix64(x ^ int(param_index))
    x = _splitmix64(x ^ (int(step) // int(update_proj_gap)))
    return x >> 1


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums of squares over thousands of bf16 values lose digits: accumulate in >= float32.
    return torch.promote_types(dtype, torch.float32)


def square_sums_low_rank(
    low_LR: Tensor,
    proj_RK: Tensor,
    c: int,
    shape: tuple[int, int] | torch.Size,
    *,
    random: bool,
) -> tuple[Tensor, Tensor]:
    """Row sums ``(M,)`` and column sums ``(N,)`` of the squared back-projection of ``low_LR``
    (shape ``shape``, in >= float32), without building the ``M x N`` matrix.

    Row i of the back-projection is ``c`` chunks ``low[i*c+k] @ P / s``, so its squared norm is
    ``sum_k low[i*c+k] (P P^T) low[i*c+k]^T / s^2``; column ``k*K+q`` gathers chunk k of every
    row, so its squared norm is ``P[:, q]^T (sum_i low[i*c+k]^T low[i*c+k]) P[:, q] / s^2``.
    Cost ``O((M*c + K*c) r^2)`` instead of ``O(M N r)`` time and ``M N`` memory.
    """
    check_granularity(shape, c)
    rows, cols = shape
    dtype = _stat_dtype(low_LR.dtype)
    low = low_LR.to(dtype)
    proj = proj_RK.to(dtype)
    scale = float(proj.shape[0]) ** 2 if random else 1.0
    gram_RR = proj @ proj.T
    row_sums_M = ((low @ gram_RR) * low).sum(dim=1).reshape(rows, c).sum(dim=1) / scale
    low_MCR = low.reshape(rows, c, -1)
    chunk_gram_CRR = torch.einsum("mcr,mcs->crs", low_MCR, low_MCR)
    # col (k, q) = P[:, q]^T G_k P[:, q]: one (c, r, K) intermediate (r*N values), not r^2*N.
    col_sums_CK = (proj.unsqueeze(0) * (chunk_gram_CRR @ proj)).sum(dim=1) / scale
    return row_sums_M, col_sums_CK.reshape(cols)


def factored_second_moment_update(
    row_M: Tensor, col_N: Tensor, sq_sums: tuple[Tensor, Tensor], beta2: float
) -> tuple[Tensor, Tensor]:
    """Adafactor's running row/column sums, decayed with ``beta2`` (new tensors returned).

    With ``(rs, cs) = sq_sums`` the row/column sums of the squared back-projected gradient
    ``G^_t`` of the ORIGINAL shape (:func:`square_sums_low_rank`):
    ``R_t = beta2 R_{t-1} + (1 - beta2) rs`` and ``C_t = beta2 C_{t-1} + (1 - beta2) cs``,
    starting from zeros; i.e. the row/column sums of Adam's ``v_t`` of ``G^``. Sums, not means
    (Adafactor's ``R C^T / 1^T R`` is then exact for a rank-1 ``v``). No eps is added here.
    """
    row_sums_M, col_sums_N = sq_sums
    row = row_M * beta2 + row_sums_M.to(row_M.dtype) * (1 - beta2)
    col = col_N * beta2 + col_sums_N.to(col_N.dtype) * (1 - beta2)
    return row, col


def factored_denominator_rows(
    row_M: Tensor, col_N: Tensor, first: int, stop: int, step: int, beta2: float, eps: float
) -> Tensor:
    """Rows ``first:stop`` (shape ``(stop - first) x N``) of ProjFactor's denominator
    ``sqrt(V^ / (1 - beta2**step)) + eps`` with ``V^ = R C^T / sum(R)``: a rank holding a run of
    the matrix builds the denominator of the rows its run covers only.

    ``step`` is 1-based (updates including this one), as Adam's bias correction. ``V^`` is
    homogeneous of degree 1 in (R, C), so correcting it equals correcting R and C. eps is added
    after the square root, as Adam's; ``sum(R)`` (= ``sum(C)``) is floored at the dtype's
    ``tiny`` so an all-zero history gives ``V^ = 0`` instead of 0/0.
    """
    total = row_M.sum().clamp_min(torch.finfo(row_M.dtype).tiny)
    # In place on the one (rows x N) buffer: the same operations, no second full-size temporary.
    denom = torch.outer(row_M[first:stop], col_N).div_(total)
    return denom.div_(1 - beta2**step).sqrt_().add_(eps)
