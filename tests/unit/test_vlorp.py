"""VLoRP granular projection and ProjFactor's factored second moment (pure functions).

The library's functions (:mod:`gnlorp_dist.optim.vlorp`) against the whole-matrix references of
tests/unit/reference_math.py, and those references against the math they stand for.
"""

from __future__ import annotations

import math

import pytest
import torch

from gnlorp_dist.optim.projection import compute_projection, project, project_back
from gnlorp_dist.optim.vlorp import (
    check_granularity,
    factored_denominator_rows,
    factored_second_moment_update,
    random_basis,
    square_sums_low_rank,
    window_seed,
)

from .reference_math import (
    factored_denominator,
    project_back_granular,
    project_granular,
    projfactor_direction,
    reshape_for_granularity,
    restore_shape,
    square_sums,
    svd_basis,
)


def _grad(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator, dtype=dtype)


def test_granularity_one_with_svd_equals_plain_projection():
    grad_MN = _grad(24, 16)
    proj_RN = compute_projection(grad_MN, 4, "right")
    assert torch.equal(svd_basis(grad_MN, 4, 1), proj_RN)
    low = project_granular(grad_MN, proj_RN, 1)
    assert torch.equal(low, project(grad_MN, proj_RN, "right"))
    back = project_back_granular(low, proj_RN, 1, grad_MN.shape, random=False)
    assert torch.equal(back, project_back(low, proj_RN, "right"))


@pytest.mark.parametrize("c", [1, 2, 4, 8])
def test_reshape_round_trip_and_row_major_chunks(c):
    grad_MN = _grad(6, 16)
    grad_LK = reshape_for_granularity(grad_MN, c)
    assert grad_LK.shape == (6 * c, 16 // c)
    # Row i of G is rows i*c .. i*c+c-1 of the reshape, in order.
    assert torch.equal(grad_LK[3 * c : 4 * c].reshape(-1), grad_MN[3])
    assert torch.equal(restore_shape(grad_LK, grad_MN.shape), grad_MN)


def test_granular_svd_basis_is_orthonormal_and_exact_at_full_rank():
    grad_MN = _grad(8, 12, dtype=torch.float64)
    proj_RK = svd_basis(grad_MN, 4, 3)  # reshaped to 24 x 4: rank 4 spans every row
    assert proj_RK.shape == (4, 4)
    # compute_projection's SVD runs in float32 whatever the input: float32-level tolerances.
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(proj_RK @ proj_RK.T, eye, rtol=0, atol=1e-5)
    low = project_granular(grad_MN, proj_RK, 3)
    assert low.shape == (24, 4)
    back = project_back_granular(low, proj_RK, 3, grad_MN.shape, random=False)
    torch.testing.assert_close(back, grad_MN, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_seeded_basis_is_reproducible_across_calls_dtypes_and_devices(kind):
    first = random_basis(10, 3, seed=1234, kind=kind)
    assert first.shape == (3, 10) and first.dtype == torch.float32
    assert torch.equal(first, random_basis(10, 3, seed=1234, kind=kind))
    assert torch.equal(
        random_basis(10, 3, seed=1234, kind=kind, dtype=torch.bfloat16), first.bfloat16()
    )
    assert torch.equal(
        random_basis(10, 3, seed=1234, kind=kind, dtype=torch.float64), first.double()
    )
    assert torch.equal(random_basis(10, 3, seed=1234, kind=kind, device=torch.device("cpu")), first)
    # The global generator is neither used nor disturbed.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    random_basis(10, 3, seed=99, kind=kind)
    assert torch.equal(torch.rand(1), expected)


def test_different_windows_and_parameters_give_different_bases():
    seeds = {window_seed(7, p, w * 50, 50) for p in range(4) for w in range(25)}
    assert len(seeds) == 100
    a = random_basis(16, 4, seed=window_seed(7, 0, 0, 50))
    b = random_basis(16, 4, seed=window_seed(7, 0, 50, 50))
    assert not torch.equal(a, b)


def test_window_seed_is_constant_inside_a_window():
    gap = 10
    for window in range(3):
        seeds = {window_seed(42, 5, step, gap) for step in range(window * gap, (window + 1) * gap)}
        assert len(seeds) == 1
    assert window_seed(42, 5, 9, gap) != window_seed(42, 5, 10, gap)
    assert window_seed(42, 5, 3, gap) != window_seed(43, 5, 3, gap)
    assert 0 <= window_seed(2**70, 3, 10**12, 1) < 2**63
    with pytest.raises(ValueError, match="update_proj_gap"):
        window_seed(0, 0, 0, 0)


def test_rademacher_entries_are_plus_minus_one():
    basis = random_basis(64, 32, seed=3, kind="rademacher")
    assert set(basis.unique().tolist()) == {-1.0, 1.0}
    # Both signs appear with frequency near 1/2 (2048 draws: 6 sigma = 0.066).
    assert abs((basis > 0).float().mean().item() - 0.5) < 0.066
    with pytest.raises(ValueError, match="kind"):
        random_basis(4, 2, seed=0, kind="uniform")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_random_back_projection_is_unbiased(kind):
    grad_MN = _grad(6, 16, seed=1, dtype=torch.float64)
    c, rank, samples = 2, 2, 4000
    total = torch.zeros_like(grad_MN)
    sq_err = 0.0
    for s in range(samples):
        proj_RK = random_basis(
            8, rank, seed=window_seed(11, 0, s, 1), kind=kind, dtype=grad_MN.dtype
        )
        low = project_granular(grad_MN, proj_RK, c)
        est = project_back_granular(low, proj_RK, c, grad_MN.shape, random=True)
        total += est
        sq_err += float((est - grad_MN).square().sum())
    mean = total / samples
    # The mean's squared error is the per-sample variance / samples: compare with 5 standard
    # deviations of that (estimated) variance; any bias (e.g. a missing 1/r) fails by far.
    std_of_mean = math.sqrt(sq_err / samples / samples)
    assert float((mean - grad_MN).norm()) < 5 * std_of_mean
    assert std_of_mean < 0.1 * float(grad_MN.norm())
    # A single sample is far from G: the test is not trivial.
    assert sq_err / samples > 0.5 * float(grad_MN.norm()) ** 2


def _direct_v_hat(back_MN: torch.Tensor) -> torch.Tensor:
    sq = back_MN.square()
    rows, cols = sq.sum(dim=1), sq.sum(dim=0)
    return torch.outer(rows, cols) / rows.sum()


@pytest.mark.parametrize(("c", "random"), [(1, False), (4, False), (2, True), (4, True)])
def test_factored_second_moment_matches_direct_computation(c, random):
    rows, cols, rank = 6, 16, 3
    grad_MN = _grad(rows, cols, seed=5, dtype=torch.float64)
    if random:
        proj_RK = random_basis(cols // c, rank, seed=8, dtype=torch.float64)
    else:
        proj_RK = svd_basis(grad_MN, rank, c)
    low = project_granular(grad_MN, proj_RK, c)
    back_MN = project_back_granular(low, proj_RK, c, grad_MN.shape, random=random)

    direct = square_sums(back_MN)
    via_low = square_sums_low_rank(low, proj_RK, c, grad_MN.shape, random=random)
    for got, want in zip(via_low, direct):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    beta2 = 0.9
    zeros = (torch.zeros(rows, dtype=torch.float64), torch.zeros(cols, dtype=torch.float64))
    row, col = factored_second_moment_update(*zeros, direct, beta2)
    denom = factored_denominator(row, col, 1, beta2, eps=0.0)
    # After one step, bias correction undoes (1 - beta2): V^ is the one-step statistic exactly.
    torch.testing.assert_close(denom.square(), _direct_v_hat(back_MN), rtol=1e-12, atol=1e-12)


def test_factored_running_average_and_projfactor_direction():
    rows, cols, c, rank, beta1, beta2, eps = 4, 12, 3, 2, 0.8, 0.95, 1e-8
    grads = [_grad(rows, cols, seed=s, dtype=torch.float64) for s in range(3)]
    proj_RK = random_basis(cols // c, rank, seed=4, dtype=torch.float64)
    row = torch.zeros(rows, dtype=torch.float64)
    col = torch.zeros(cols, dtype=torch.float64)
    exp_avg = torch.zeros(rows * c, rank, dtype=torch.float64)
    v_rows, v_cols = torch.zeros(rows, dtype=torch.float64), torch.zeros(cols, dtype=torch.float64)
    for grad in grads:
        low = project_granular(grad, proj_RK, c)
        exp_avg = beta1 * exp_avg + (1 - beta1) * low
        sums = square_sums_low_rank(low, proj_RK, c, grad.shape, random=True)
        row, col = factored_second_moment_update(row, col, sums, beta2)
        # Reference: row/col sums of Adam's v_t of the back-projected gradients.
        back = project_back_granular(low, proj_RK, c, grad.shape, random=True)
        v_rows = beta2 * v_rows + (1 - beta2) * back.square().sum(dim=1)
        v_cols = beta2 * v_cols + (1 - beta2) * back.square().sum(dim=0)
    torch.testing.assert_close(row, v_rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(col, v_cols, rtol=1e-12, atol=1e-12)

    step = len(grads)
    direction = projfactor_direction(
        exp_avg, proj_RK, c, (rows, cols), row, col, step,
        beta1=beta1, beta2=beta2, eps=eps, random=True,
    )  # fmt: skip
    m_hat = project_back_granular(exp_avg, proj_RK, c, (rows, cols), random=True)
    m_hat = m_hat / (1 - beta1**step)
    v_hat = torch.outer(v_rows, v_cols) / v_rows.sum() / (1 - beta2**step)
    torch.testing.assert_close(direction, m_hat / (v_hat.sqrt() + eps), rtol=1e-10, atol=1e-12)


def test_zero_history_gives_eps_denominator():
    denom = factored_denominator_rows(torch.zeros(3), torch.zeros(5), 0, 3, 1, 0.999, 1e-8)
    assert torch.equal(denom, torch.full((3, 5), 1e-8))


def test_denominator_rows_are_the_rows_of_the_whole_denominator():
    """What a rank holding rows ``first:stop`` of the matrix builds is that slice, bitwise."""
    generator = torch.Generator().manual_seed(3)
    row, col = torch.rand(6, generator=generator), torch.rand(5, generator=generator)
    whole = factored_denominator(row, col, 4, 0.99, 1e-8)
    for first, stop in ((0, 6), (0, 2), (2, 5), (5, 6), (3, 3)):
        rows = factored_denominator_rows(row, col, first, stop, 4, 0.99, 1e-8)
        assert torch.equal(rows, whole[first:stop])


@pytest.mark.parametrize("c", [0, -2, 3, 1.0, True])
def test_bad_granularity_raises(c):
    with pytest.raises(ValueError, match="granularity c="):
        check_granularity((4, 10), c)


def test_non_dividing_granularity_names_c_and_m():
    with pytest.raises(ValueError, match=r"c=3 must divide the number of columns m=10"):
        check_granularity((4, 10), 3)
    with pytest.raises(ValueError, match=r"c=4 .* m=10"):
        check_granularity(torch.Size((4, 10)), 4)
    with pytest.raises(ValueError, match="2-D"):
        check_granularity((2, 3, 4), 1)
