"""Quantised projection bases (proj_bits), lazy refresh and the automatic SVD method."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch

from gnlorp_dist import GradNormLoRPAdamW
from gnlorp_dist.memory.bytes import basis_bytes
from gnlorp_dist.optim.projection import (
    RANDOMIZED_MIN_DIM,
    compute_projection,
    project,
    resolve_svd_method,
    subspace_overlap,
)
from gnlorp_dist.optim.quantized_basis import (
    PROJ_GROUP_SIZE,
    dequantize_basis,
    quantize_basis,
)
from gnlorp_dist.optim.refresh import next_gap, refresh_due
from gnlorp_dist.optim.spec import ProjectionSpec


def _low_rank_gradient(rows, cols, rank, seed, noise=0.05):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=gen)
    right = torch.randn(rank, cols, generator=gen)
    return left @ right + noise * torch.randn(rows, cols, generator=gen)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_basis_error_is_within_half_a_step_of_each_group(bits):
    basis = compute_projection(_low_rank_gradient(300, 256, 16, 0), 32, "right")
    codes, scales = quantize_basis(basis, bits)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape == (32, 256 if bits == 8 else 128)
    assert scales.shape == (32, 256 // PROJ_GROUP_SIZE)
    restored = dequantize_basis(codes, scales, torch.float32)
    # Symmetric rounding: every value within half a quantisation step of its group.
    step = scales.repeat_interleave(PROJ_GROUP_SIZE, dim=1)
    assert ((restored - basis).abs() <= step / 2 + 1e-7).all()
    stored = codes.numel() * codes.element_size() + scales.numel() * 4
    assert stored == basis_bytes((32, 256), bits, 4)
    assert stored <= (0.27 if bits == 8 else 0.15) * basis.numel() * 4


def test_int4_codes_pack_two_per_byte_and_unpack_exactly():
    values = torch.arange(-7, 9).clamp(max=7).float().repeat(4, 16)[:, :128]  # every code
    codes, scales = quantize_basis(values, 4)
    assert torch.equal(dequantize_basis(codes, scales, torch.float32), values)


@pytest.mark.parametrize(("bits", "kept"), [(8, 0.999), (4, 0.95)])
def test_quantised_basis_keeps_the_gradient_energy(bits, kept):
    """The energy ``||G P^T||^2`` a restored basis captures against the float basis's: the
    principled measure of the subspace quality (rounding perturbs each basis vector by
    ~1/(2 qmax) of its group's largest value)."""
    grad = _low_rank_gradient(512, 384, 24, 1)
    basis = compute_projection(grad, 32, "right")
    restored = dequantize_basis(*quantize_basis(basis, bits), torch.float32)
    energy = project(grad, basis, "right").square().sum()
    ratio = float(project(grad, restored, "right").square().sum() / energy)
    assert kept <= ratio <= 1 + (1 - kept), ratio


def _problem(proj_bits=None, lr=1e-2, rank=16, gap=4, **options):
    torch.manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(192, 128) * 0.1)
    group = {
        "params": [matrix],
        "rank": rank,
        "update_proj_gap": gap,
        "scale": 0.25,
        "proj_type": "std",
        **options,
    }
    if proj_bits is not None:
        group["proj_bits"] = proj_bits
    return matrix, GradNormLoRPAdamW([group], lr=lr)


def _gradients(steps, seed, settled):
    """Gradients whose dominant subspace is fixed (``settled``) or new at every step."""
    fixed = _low_rank_gradient(192, 128, 8, seed, noise=0.01)
    return [
        fixed * (1 + 0.01 * i) if settled else _low_rank_gradient(192, 128, 8, seed + i)
        for i in range(steps)
    ]


@pytest.mark.parametrize(("bits", "within"), [(8, 0.005), (4, 0.10)])
def test_optimizer_with_quantised_bases_trains_like_float_bases_and_resumes_bitwise(bits, within):
    """Judged by the loss: ``||W - W*||^2`` with W* of rank 8 projected at rank 8 in the
    subspace of the first gradient, 30 steps. (Frequent refreshes of this problem are chaotic:
    each new basis re-mixes Adam's moments, and float runs themselves wander by 5% there.)"""
    target = _low_rank_gradient(192, 128, 8, 3, noise=0.0) * 0.05

    def train(matrix, optimizer, steps):
        for _ in range(steps):
            matrix.grad = (matrix.detach() - target) * 2
            optimizer.step()
        return float((matrix.detach() - target).square().sum())

    reference, ref_opt = _problem(lr=0.1, rank=8, gap=100)
    matrix, optimizer = _problem(proj_bits=bits, lr=0.1, rank=8, gap=100)
    with torch.no_grad():  # all of the error lies in a rank-8 subspace
        reference.zero_()
        matrix.zero_()
    start = float(target.square().sum())
    float_loss = train(reference, ref_opt, 30)
    loss = train(matrix, optimizer, 15)
    state = optimizer.state[matrix]
    assert "proj_scale" in state and state["proj"].dtype in (torch.int8, torch.uint8)

    buffer = io.BytesIO()
    torch.save({"opt": optimizer.state_dict(), "w": matrix.detach().clone()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = _problem(proj_bits=bits, lr=0.1, rank=8, gap=100)
    with torch.no_grad():
        resumed.copy_(saved["w"])
    resumed_opt.load_state_dict(saved["opt"])
    loss = train(matrix, optimizer, 15)
    assert train(resumed, resumed_opt, 15) == loss  # the same steps from the loaded state
    assert torch.equal(matrix.detach(), resumed.detach())
    assert float_loss < 0.5 * start  # the run learns
    assert abs(loss - float_loss) < within * (start - float_loss), (loss, float_loss, start)


def test_int4_refuses_an_odd_basis_dimension():
    matrix = torch.nn.Parameter(torch.randn(64, 33))  # right side: basis (r, 33)
    with pytest.raises(ValueError, match="proj_bits=4 packs two values per byte"):
        GradNormLoRPAdamW(
            [{"params": [matrix], "rank": 4, "update_proj_gap": 2, "scale": 1.0,
              "proj_type": "std", "proj_bits": 4}]
        )  # fmt: skip
    with pytest.raises(ValueError, match="proj_bits=3"):
        _problem(proj_bits=3)


def test_next_gap_doubles_for_a_settled_subspace_and_resets_when_it_moves():
    fixed = ProjectionSpec(rank=4, update_proj_gap=10, scale=1.0)
    group = replace(fixed, lazy_refresh_threshold=0.9)
    assert next_gap(group, 10, None) == 10  # first refresh: nothing to compare
    assert next_gap(group, 10, 0.95) == 20
    assert next_gap(group, 40, 0.99) == 80
    assert next_gap(group, 80, 0.99) == 80  # 8x the gap at most
    assert next_gap(group, 80, 0.5) == 10
    assert next_gap(fixed, 10, 0.99) == 10  # lazy refresh off
    assert refresh_due(group, {"step": 7, "next_refresh": 7})
    assert not refresh_due(group, {"step": 7, "next_refresh": 9})
    assert refresh_due(fixed, {"step": 20})


def test_subspace_overlap_measures_every_direction():
    basis = torch.linalg.qr(torch.randn(50, 6))[0]  # (M, r), left side
    rotated = basis @ torch.linalg.qr(torch.randn(6, 6))[0]
    assert float(subspace_overlap(basis, rotated, "left")) == pytest.approx(1.0, abs=1e-5)
    half = torch.cat([basis[:, :3], torch.linalg.qr(torch.randn(50, 3))[0]], dim=1)
    other = torch.linalg.qr(half - basis @ (basis.T @ half) * torch.tensor([0, 0, 0, 1, 1, 1]))[0]
    assert float(subspace_overlap(basis, other, "left")) < 0.9


@pytest.mark.parametrize(("settled", "fewer"), [(True, True), (False, False)])
def test_lazy_refresh_skips_svds_only_where_the_subspace_settled(settled, fewer):
    grads = _gradients(40, 9, settled=settled)
    fixed, fixed_opt = _problem()
    lazy, lazy_opt = _problem(lazy_refresh_threshold=0.9)
    for grad in grads:
        fixed.grad, lazy.grad = grad.clone(), grad.clone()
        fixed_opt.step()
        lazy_opt.step()
    assert fixed_opt.refresh_count == 10  # steps 0, 4, ..., 36
    if fewer:
        assert lazy_opt.refresh_count <= 5, lazy_opt.refresh_count  # gaps 4, 8, 16, 32
        assert lazy_opt.state[lazy]["proj_gap"] > 4
    else:
        assert lazy_opt.refresh_count == fixed_opt.refresh_count
        assert lazy_opt.state[lazy]["proj_gap"] == 4


def test_auto_svd_is_randomized_above_the_threshold():
    assert resolve_svd_method("auto", (4096, 11008)) == "randomized"
    assert resolve_svd_method("auto", (RANDOMIZED_MIN_DIM - 1, 8192)) == "svd"
    assert resolve_svd_method("svd", (4096, 4096)) == "svd"
