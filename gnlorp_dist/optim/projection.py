"""Low-rank gradient projection as pure functions (GaLore semantics).

A projected matrix ``grad_MN`` (M rows, N columns) is reduced to a rank-``r`` representation by
an orthonormal basis ``proj`` taken from its SVD:

- side ``"right"``: ``proj_RN = Vh[:r]`` and ``low_RMr = grad_MN @ proj_RN.T`` (shape M x r);
- side ``"left"``:  ``proj_MR = U[:, :r]`` and ``low_rN = proj_MR.T @ grad_MN`` (shape r x N).

``project_back`` undoes the projection with the same basis. Nothing here knows about optimizers,
ranks or processes: the optimizer (and later the distributed layer) call these functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

Side = Literal["left", "right"]

PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right")
"""Supported ``proj_type`` values.

- ``std`` (default, GaLore's): right side when rows >= cols, else left. The projection matrix is
  the smaller one (r x min(M, N)), the low-rank state is r x max(M, N).
- ``reverse_std``: the opposite choice; it keeps the *smaller state* (r x min(M, N)) at the cost
  of a larger projection matrix.
- ``left`` / ``right``: always that side.
"""

SVD_METHODS: tuple[str, ...] = ("auto", "svd", "randomized")
"""``auto`` (default): ``randomized`` for matrices whose smaller side is at least
:data:`RANDOMIZED_MIN_DIM`, where the full SVD's cost (``M N min(M, N)``) and workspace (a float32
``U`` as large as the gradient) dominate a refresh; the exact ``svd`` below it."""

RANDOMIZED_MIN_DIM = 2048


def resolve_svd_method(method: str, shape: tuple[int, int] | torch.Size) -> str:
    """The decomposition ``method`` runs for a gradient of ``shape`` (``auto`` resolved)."""
    if method == "auto":
        return "randomized" if min(shape) >= RANDOMIZED_MIN_DIM else "svd"
    return method


def projection_side(shape: tuple[int, int] | torch.Size, proj_type: str) -> Side:
    """The side a matrix of ``shape`` is projected on under ``proj_type``."""
    rows, cols = shape
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    if proj_type in ("left", "right"):
        return proj_type  # type: ignore[return-value]
    raise ValueError(f"proj_type={proj_type!r} is not supported; use one of {PROJ_TYPES}")


def projection_shape(shape: tuple[int, int] | torch.Size, rank: int, side: Side) -> tuple[int, int]:
    """Shape of the projection matrix for a ``shape`` matrix at ``rank`` on ``side``."""
    rows, cols = shape
    return (rank, cols) if side == "right" else (rows, rank)


def low_rank_shape(shape: tuple[int, int] | torch.Size, rank: int, side: Side) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments) of a ``shape`` matrix."""
    rows, cols = shape
    return (rows, rank) if side == "right" else (rank, cols)


@contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """CUDA matmuls in full float32 inside, whatever the process's TF32 setting; restored after.

    TF32 (on by default in training runs, ``--tf32``) keeps 10 bits of mantissa: enough for a
    forward pass, not for a subspace. The randomized range finder's sketches and power
    iterations and the lazy refresh's overlap would then depend on a speed switch, and a TF32
    overlap can cross the lazy threshold where the fp32 one does not. cuSOLVER's SVD and QR do
    not use TF32 either way. torch >= 2.9 takes the setting through ``fp32_precision`` and
    raises when that API and the legacy ``allow_tf32`` are mixed, so each is saved and
    restored through the API it came from. Cheap (two attribute writes): refresh steps only.
    """
    matmul = torch.backends.cuda.matmul
    try:
        saved = matmul.fp32_precision  # torch >= 2.9
    except AttributeError:
        saved_legacy = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = saved_legacy
        return
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def compute_projection(
    grad_MN: Tensor,
    rank: int,
    side: Side,
    *,
    method: str = "auto",
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Orthonormal basis of the top-``rank`` singular subspace of ``grad_MN`` on ``side``.

    The decomposition runs in float32 whatever the gradient's dtype (bf16 SVDs are not
    supported and lose the subspace); the basis is returned in the gradient's dtype, as GaLore
    does, so it multiplies the gradient without casts.

    ``method="randomized"`` uses a randomized range finder (Halko et al. 2011) with
    ``oversample`` extra columns and ``power_iters`` power iterations: much cheaper than a full
    SVD for ``rank << min(M, N)``; its subspace error is measured by the benchmarks.
    """
    assert grad_MN.dim() == 2, f"projection needs a 2-D gradient, got shape {tuple(grad_MN.shape)}"
    matrix = grad_MN.float()
    method = resolve_svd_method(method, grad_MN.shape)
    if method == "svd":
        U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    elif method == "randomized":
        with full_fp32_matmuls():
            U, Vh = _randomized_svd(matrix, rank, oversample, power_iters, generator)
    else:
        raise ValueError(f"svd method {method!r} is not supported; use one of {SVD_METHODS}")
    basis = Vh[:rank] if side == "right" else U[:, :rank]
    return basis.contiguous().to(grad_MN.dtype)


def _randomized_svd(
    matrix_MN: Tensor,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    rows, cols = matrix_MN.shape
    width = min(rank + oversample, rows, cols)
    # Work on the side with fewer rows so the sketch is the cheap one.
    transposed = rows < cols
    a = matrix_MN.T if transposed else matrix_MN
    omega = torch.randn(a.shape[1], width, generator=generator, dtype=a.dtype, device=a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    u_small, _, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ u_small
    if transposed:
        return vh.T, u.T
    return u, vh


def project(grad_MN: Tensor, proj: Tensor, side: Side) -> Tensor:
    """Low-rank form of ``grad_MN``: ``grad @ proj.T`` (right) or ``proj.T @ grad`` (left)."""
    return grad_MN @ proj.T if side == "right" else proj.T @ grad_MN


def project_back(low: Tensor, proj: Tensor, side: Side) -> Tensor:
    """Full-size form of a low-rank tensor: ``low @ proj`` (right) or ``proj @ low`` (left)."""
    return low @ proj if side == "right" else proj @ low


def subspace_overlap(old_basis: Tensor, new_basis: Tensor, side: Side) -> Tensor:
    """How much of the new subspace the old one still spans: ``||P_old^T P_new||_F^2 / r``, the
    mean squared cosine of the principal angles over ALL ``r`` directions (1: the same
    subspace, 0: orthogonal; a rotation inside the subspace changes nothing). A 0-d float32
    tensor on the bases' device."""
    if side == "right":  # rows are the basis vectors
        old_basis, new_basis = old_basis.T, new_basis.T
    with full_fp32_matmuls():
        cross = old_basis.float().T @ new_basis.float()
    return cross.square().sum() / new_basis.shape[1]


def subspace_error(reference_basis: Tensor, basis: Tensor, side: Side) -> float:
    """Distance between two orthonormal bases' spans: ``||P_ref - P||_2`` of their projectors.

    0 for the same subspace, 1 for orthogonal ones; used to measure the randomized finder.
    """
    if side == "right":
        reference_basis, basis = reference_basis.T, basis.T
    ref = reference_basis.double()
    other = basis.double()
    difference = ref @ ref.T - other @ other.T
    return float(torch.linalg.matrix_norm(difference, ord=2))
