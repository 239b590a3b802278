"""VLoRP (granularity, random bases) and ProjFactor inside GradNormLoRPAdamW, on one process.

The math is checked against hand-written loops over :mod:`gnlorp_dist.optim.vlorp`'s pure functions
and the whole-matrix references of tests/unit/reference_math.py;
the seeding (one random basis per refresh window, never stored) against resumed and
accumulated runs.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from gnlorp_dist import (
    GradNormLoRPAdamW,
    PerLayerUpdates,
    apply_weight_norm,
    projected_param_groups,
)
from gnlorp_dist.optim.functional import galore_step_size
from gnlorp_dist.optim.projection import compute_projection, projection_side
from gnlorp_dist.optim.vlorp import (
    factored_second_moment_update,
    random_basis,
    square_sums_low_rank,
    window_seed,
)

from .reference_math import (
    project_back_granular,
    project_granular,
    projected_adamw_step,
    projfactor_direction,
    svd_basis,
)
from .test_groups import tiny_llama

SHAPE = (24, 16)
LR, WD, SCALE, EPS = 1e-2, 0.01, 0.5, 1e-6
BETAS = (0.9, 0.999)


def _grads(steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen) for _ in range(steps)]


def _weights() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))


def _optimizer(param: torch.Tensor, **options) -> GradNormLoRPAdamW:
    group = {"params": [param], "rank": 2, "update_proj_gap": 2, "scale": SCALE}
    group.setdefault("proj_type", "std")
    group.update(options)
    return GradNormLoRPAdamW([group], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def _run(grads, **options) -> tuple[torch.Tensor, GradNormLoRPAdamW]:
    param = torch.nn.Parameter(_weights())
    opt = _optimizer(param, **options)
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    return param.detach(), opt


def test_granularity_one_is_todays_optimizer_bitwise():
    grads = _grads(5)
    ours, _ = _run(grads, granularity=1)
    plain, _ = _run(grads)
    # Today's math by hand: SVD on the std side at steps 0, 2, 4; GaLore's AdamW.
    weights = _weights()
    side = projection_side(SHAPE, "std")
    exp_avg = exp_avg_sq = proj = None
    for t, grad in enumerate(grads):
        if t % 2 == 0:
            proj = compute_projection(grad, 2, side)
        low = grad @ proj.T if side == "right" else proj.T @ grad
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        projected_adamw_step(
            weights, low, exp_avg, exp_avg_sq, proj, side, step=t + 1, lr=LR,
            beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, scale=SCALE,
        )  # fmt: skip
    assert torch.equal(ours, plain)
    assert torch.equal(ours, weights)


def _adam_by_hand(grads, c, *, random: bool, kind: str = "gaussian", seed: int = 0):
    weights = _weights()
    exp_avg = exp_avg_sq = proj = None
    for t, grad in enumerate(grads):
        if t % 2 == 0:
            if random:
                proj = random_basis(SHAPE[1] // c, 2, seed=window_seed(seed, 0, t, 2), kind=kind)
            else:
                proj = svd_basis(grad, 2, c, method="svd")
        low = project_granular(grad, proj, c)
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        exp_avg.mul_(BETAS[0]).add_(low, alpha=1 - BETAS[0])
        exp_avg_sq.mul_(BETAS[1]).addcmul_(low, low, value=1 - BETAS[1])
        direction = exp_avg / (exp_avg_sq.sqrt() + EPS)
        back = project_back_granular(direction, proj, c, SHAPE, random=random)
        weights -= galore_step_size(LR, *BETAS, t + 1) * SCALE * back
        weights -= LR * WD * weights
    return weights


@pytest.mark.parametrize("proj_type", ["std", "right"])
def test_granularity_with_svd_basis_equals_the_vlorp_loop(proj_type):
    grads = _grads(3)
    ours, opt = _run(grads, granularity=4, proj_type=proj_type)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].shape == (SHAPE[0] * 4, 2) and state["proj"].shape == (2, 4)
    torch.testing.assert_close(ours, _adam_by_hand(grads, 4, random=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_random_basis_equals_the_vlorp_loop_and_stores_no_basis(kind):
    grads = _grads(3)
    ours, opt = _run(grads, granularity=2, proj_type="random", random_basis=kind)
    expected = _adam_by_hand(grads, 2, random=True, kind=kind)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert opt.refresh_count == 0
    saved = opt.state_dict()
    for entry in saved["state"].values():
        assert "proj" not in entry and "proj_scale" not in entry
        assert set(entry) >= {"step", "exp_avg", "exp_avg_sq"}


def test_random_runs_are_bitwise_reproducible_and_seeded():
    grads = _grads(5)
    first, _ = _run(grads, granularity=4, proj_type="random", projection_seed=3)
    second, _ = _run(grads, granularity=4, proj_type="random", projection_seed=3)
    other, _ = _run(grads, granularity=4, proj_type="random", projection_seed=4)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("second_moment", ["adam", "factored"])
def test_random_resume_mid_window_is_bitwise(second_moment):
    options = {"granularity": 4, "proj_type": "random", "second_moment": second_moment}
    grads = _grads(6)
    uninterrupted, _ = _run(grads, update_proj_gap=4, **options)
    # Stop after 2 of the window's 4 steps; resume from a saved state in a fresh optimizer.
    head, opt = _run(grads[:2], update_proj_gap=4, **options)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    param = torch.nn.Parameter(head.clone())
    resumed = _optimizer(param, update_proj_gap=4, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for grad in grads[2:]:
        param.grad = grad.clone()
        resumed.step()
    assert torch.equal(param.detach(), uninterrupted)


def _factored_by_hand(grads, c, *, random: bool):
    weights = _weights()
    exp_avg = proj = None
    row, col = torch.zeros(SHAPE[0]), torch.zeros(SHAPE[1])
    for t, grad in enumerate(grads):
        if t % 2 == 0:
            if random:
                proj = random_basis(SHAPE[1] // c, 2, seed=window_seed(0, 0, t, 2))
            else:
                proj = svd_basis(grad, 2, c, method="svd")
        low = project_granular(grad, proj, c)
        sums = square_sums_low_rank(low, proj, c, SHAPE, random=random)
        row, col = factored_second_moment_update(row, col, sums, BETAS[1])
        exp_avg = torch.zeros_like(low) if exp_avg is None else exp_avg
        exp_avg = exp_avg * BETAS[0] + low * (1 - BETAS[0])
        direction = projfactor_direction(
            exp_avg, proj, c, SHAPE, row, col, t + 1,
            beta1=BETAS[0], beta2=BETAS[1], eps=EPS, random=random,
        )  # fmt: skip
        weights -= LR * SCALE * direction
        weights -= LR * WD * weights
    return weights, row, col


@pytest.mark.parametrize("proj_type", ["random", "right"])
def test_projfactor_equals_the_direct_computation(proj_type):
    grads = _grads(3)
    random = proj_type == "random"
    ours, opt = _run(grads, granularity=2, proj_type=proj_type, second_moment="factored")
    weights, row, col = _factored_by_hand(grads, 2, random=random)
    state = next(iter(opt.state.values()))
    assert "exp_avg_sq" not in state and state["exp_avg"].shape == (SHAPE[0] * 2, 2)
    assert state["row_sq"].dtype == torch.float32 and state["row_sq"].shape == (SHAPE[0],)
    torch.testing.assert_close(state["row_sq"], row, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["col_sq"], col, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours, weights, rtol=1e-5, atol=1e-6)


def test_projfactor_with_8bit_first_moments_runs():
    grads = _grads(4)
    options = {"granularity": 2, "proj_type": "random", "second_moment": "factored"}
    floats, _ = _run(grads, **options)
    quantised, opt = _run(grads, bits=8, min_8bit_size=16, **options)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in state
    assert "exp_avg_sq" not in state and "exp_avg_sq_absmax" not in state
    assert torch.isfinite(quantised).all()
    start = _weights()
    moved = (floats - start).norm()
    assert (quantised - floats).norm() < 0.1 * moved


def test_invalid_options_name_the_fix():
    param = torch.nn.Parameter(_weights())
    with pytest.raises(ValueError, match="granularity c=5 must divide"):
        _optimizer(param, granularity=5)
    with pytest.raises(ValueError, match="resolves to the left"):
        _optimizer(param, granularity=2, proj_type="left")
    with pytest.raises(ValueError, match="stores none"):
        _optimizer(param, proj_type="random", proj_bits=8)
    with pytest.raises(ValueError, match="independent draws"):
        _optimizer(param, proj_type="random", lazy_refresh_threshold=0.5)
    with pytest.raises(ValueError, match="needs a right-side projection"):
        _optimizer(param, proj_type="left", second_moment="factored")
    with pytest.raises(ValueError, match="second_moment='bogus'"):
        _optimizer(param, second_moment="bogus")
    with pytest.raises(ValueError, match="random_basis='uniform'"):
        _optimizer(param, proj_type="random", random_basis="uniform")


def _model_and_optimizer(seed=3, **options):
    model = apply_weight_norm(tiny_llama(seed=seed))
    groups = projected_param_groups(model, rank=2, update_proj_gap=2, scale=0.25, **options)
    return model, GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01)


def _micro_batches(step, k):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(k)]


@pytest.mark.parametrize("second_moment", ["adam", "factored"])
def test_per_layer_accumulation_uses_one_basis_per_window(second_moment):
    options = {"granularity": 4, "proj_type": "random", "second_moment": second_moment}
    normal, normal_opt = _model_and_optimizer(**options)
    layered = copy.deepcopy(normal)
    layered_opt = GradNormLoRPAdamW(
        projected_param_groups(layered, rank=2, update_proj_gap=2, scale=0.25, **options),
        lr=1e-2,
        weight_decay=0.01,
    )
    with PerLayerUpdates(layered_opt, accumulation_steps=2):
        for step in range(3):  # windows 0-1 and 2: two micro-batches each step
            batches = _micro_batches(step, 2)
            normal_opt.zero_grad()
            for ids in batches:
                (normal(input_ids=ids, labels=ids).loss / 2).backward()
            normal_opt.step()
            for ids in batches:
                (layered(input_ids=ids, labels=ids).loss / 2).backward()
    with torch.no_grad():
        worst = max(
            float((p - q).norm() / q.norm())
            for p, q in zip(layered.parameters(), normal.parameters())
        )
    assert worst < 1e-5
    assert layered_opt.refresh_count == normal_opt.refresh_count == 0


@pytest.mark.parametrize(
    "options",
    [
        {"granularity": 4, "proj_type": "right"},
        {"granularity": 4, "proj_type": "random", "second_moment": "factored"},
    ],
)
def test_weight_norm_model_trains_with_granularity(options):
    model, opt = _model_and_optimizer(**options)
    for group in opt.param_groups:
        group["lr"] = 3e-2
    ids = _micro_batches(0, 1)[0]
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses


def test_memory_estimator_counts_the_factored_second_moment():
    from gnlorp_dist.memory.arithmetic import Layout, ParamShape
    from gnlorp_dist.memory.estimator import MemoryConfig

    param = ParamShape(name="w", shape=(1376, 512), projected=True)
    adam = Layout(MemoryConfig(model="llama_60m"), 128).states(param)
    factored = Layout(MemoryConfig(model="llama_60m", second_moment="factored"), 128).states(param)
    low_rank_moment = 1376 * 128 * 2  # bf16
    assert adam[0] == 2 * low_rank_moment
    assert factored == (low_rank_moment + 4 * (1376 + 512), adam[1])


@pytest.mark.parametrize("proj_bits", [8, 4])
def test_granularity_composes_with_quantised_bases_and_8bit_moments(proj_bits):
    grads = _grads(4)
    floats, _ = _run(grads, granularity=4, proj_type="right")
    quantised, opt = _run(
        grads, granularity=4, proj_type="right", proj_bits=proj_bits, bits=8, min_8bit_size=16
    )
    state = next(iter(opt.state.values()))
    assert state["proj"].shape == ((2, 4) if proj_bits == 8 else (2, 2)) and "proj_scale" in state
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == (SHAPE[0] * 4, 2)
    moved = (floats - _weights()).norm()
    assert (quantised - floats).norm() < 0.2 * moved
