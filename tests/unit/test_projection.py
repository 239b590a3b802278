"""The pure projection functions."""

from __future__ import annotations

import pytest
import torch

from gnlorp_dist.optim.projection import (
    compute_projection,
    low_rank_shape,
    project,
    project_back,
    projection_shape,
    projection_side,
    subspace_error,
)


@pytest.mark.parametrize(
    ("shape", "proj_type", "side"),
    [
        ((40, 24), "std", "right"),
        ((24, 40), "std", "left"),
        ((32, 32), "std", "right"),
        ((40, 24), "reverse_std", "left"),
        ((24, 40), "reverse_std", "right"),
        ((40, 24), "left", "left"),
        ((24, 40), "right", "right"),
    ],
)
def test_side_rules(shape, proj_type, side):
    assert projection_side(shape, proj_type) == side


def test_reverse_std_keeps_the_smaller_state():
    for shape in [(40, 24), (24, 40)]:
        std = low_rank_shape(shape, 4, projection_side(shape, "std"))
        rev = low_rank_shape(shape, 4, projection_side(shape, "reverse_std"))
        assert rev[0] * rev[1] < std[0] * std[1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_projection_is_the_top_singular_subspace(side):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 4))
    v, _ = torch.linalg.qr(torch.randn(20, 4))
    grad = u @ torch.diag(torch.tensor([9.0, 7.0, 5.0, 3.0])) @ v.T
    proj = compute_projection(grad, 4, side)
    assert proj.shape == projection_shape(grad.shape, 4, side)
    low = project(grad, proj, side)
    assert low.shape == low_rank_shape(grad.shape, 4, side)
    # The gradient lies in the rank-4 subspace, so projecting there and back is lossless.
    torch.testing.assert_close(project_back(low, proj, side), grad, atol=1e-5, rtol=1e-5)
    basis = proj.T if side == "right" else proj
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)


def test_randomized_range_finder_recovers_the_subspace():
    torch.manual_seed(0)
    grad = torch.randn(200, 8) @ torch.randn(8, 120) + 1e-3 * torch.randn(200, 120)
    for side in ("left", "right"):
        exact = compute_projection(grad, 8, side)
        gen = torch.Generator().manual_seed(0)
        approx = compute_projection(grad, 8, side, method="randomized", generator=gen)
        assert approx.shape == exact.shape
        assert subspace_error(exact, approx, side) < 1e-3
    unrelated = compute_projection(torch.randn(200, 120), 8, "left")
    assert (
        subspace_error(exact_left := compute_projection(grad, 8, "left"), unrelated, "left") > 0.5
    )
    assert exact_left.shape == (200, 8)


def test_svd_runs_in_float32_for_bf16_gradients():
    grad = torch.randn(24, 16).to(torch.bfloat16)
    proj = compute_projection(grad, 4, "right")
    assert proj.dtype == torch.bfloat16
    ref = compute_projection(grad.float(), 4, "right")
    assert subspace_error(ref, proj.float(), "right") < 2e-2


def test_unknown_proj_type_and_method():
    with pytest.raises(ValueError, match="proj_type='full'"):
        projection_side((4, 4), "full")
    with pytest.raises(ValueError, match="svd method 'qr'"):
        compute_projection(torch.randn(4, 4), 2, "left", method="qr")
