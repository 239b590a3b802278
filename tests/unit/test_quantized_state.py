"""8-bit optimizer moments: same math as 32-bit through MomentStore, a quarter of the bytes."""

from __future__ import annotations

import io

import pytest
import torch

from gnlorp_dist import GradNormLoRPAdamW, GradNormLoRPAdamW8bit
from gnlorp_dist.memory.bytes import state_bytes
from gnlorp_dist.optim.quantized import MIN_8BIT_NUMEL, dequantize_8bit, quantize_8bit

pytest.importorskip("bitsandbytes")


def test_round_trip_error_is_small_for_both_maps():
    torch.manual_seed(0)
    signed = torch.randn(300, 70)
    codes, absmax = quantize_8bit(signed, signed=True)
    assert codes.dtype == torch.uint8 and codes.shape == signed.shape
    err = (dequantize_8bit(codes, absmax, signed=True) - signed).norm() / signed.norm()
    assert err < 0.02
    positive = signed.square() * 1e-6
    codes, absmax = quantize_8bit(positive, signed=False)
    back = dequantize_8bit(codes, absmax, signed=False)
    assert (back >= 0).all()
    assert (back - positive).norm() / positive.norm() < 0.02


def _groups(params):
    return [
        {"params": params[:2], "rank": 16, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"},
        {"params": params[2:]},
    ]


def _make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(256, 128), (128, 384), (8000, 32), (64,)]  # tall, wide, embedding-like, vector
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]


def _grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def _run(params, opt, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()


def test_8bit_states_use_at_most_30_percent_and_track_32bit():
    full, quant = _make_params(), _make_params()
    grads = _grads(full, steps=12)
    opt32 = GradNormLoRPAdamW(_groups(full), lr=1e-3)
    opt8 = GradNormLoRPAdamW8bit(_groups(quant), lr=1e-3)
    _run(full, opt32, grads)
    _run(quant, opt8, grads)
    initial = _make_params()
    for p32, p8, p0 in zip(full, quant, initial):
        s32, s8 = opt32.state[p32], opt8.state[p8]
        moments32 = s32["exp_avg"].nbytes + s32["exp_avg_sq"].nbytes
        moments8 = sum(v.nbytes for k, v in s8.items() if k.startswith("exp_avg"))
        if s32["exp_avg"].numel() >= MIN_8BIT_NUMEL:
            assert s8["exp_avg"].dtype == torch.uint8
            assert moments8 <= 0.30 * moments32, (moments8, moments32)
        else:
            assert s8["exp_avg"].dtype == torch.float32  # small tensors stay float
        with torch.no_grad():
            moved = float((p32 - p0).norm())
            gap = float((p8 - p32).norm())
        assert moved > 0
        assert gap < 0.05 * moved, (gap, moved)
    total32 = state_bytes([opt32.state[p] for p in full])["total"]
    total8 = state_bytes([opt8.state[p] for p in quant])["total"]
    assert total8 < 0.5 * total32


def test_8bit_state_dict_loads_weights_only_and_resumes_bitwise():
    grads = _grads(_make_params(), steps=9, seed=3)
    straight = _make_params()
    _run(straight, GradNormLoRPAdamW8bit(_groups(straight), lr=1e-3), grads)

    first = _make_params()
    opt = GradNormLoRPAdamW8bit(_groups(first), lr=1e-3)
    _run(first, opt, grads[:4])
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in first]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = GradNormLoRPAdamW8bit(_groups(resumed), lr=1e-3)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0]]["exp_avg"].dtype == torch.uint8
    assert opt2.state[resumed[0]]["exp_avg_absmax"].dtype == torch.float32
    _run(resumed, opt2, grads[4:])
    for p, q in zip(resumed, straight):
        assert torch.equal(p.detach(), q.detach())


def test_bf16_parameters_keep_float32_scales_after_load():
    p = torch.nn.Parameter(torch.randn(128, 64).to(torch.bfloat16))
    opt = GradNormLoRPAdamW8bit([p])
    p.grad = torch.randn(128, 64).to(torch.bfloat16)
    opt.step()
    fresh = GradNormLoRPAdamW8bit([p])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg_absmax"].dtype == torch.float32
    assert fresh.state[p]["exp_avg"].dtype == torch.uint8


def test_8bit_projected_update_with_bf16_weights():
    weight = torch.nn.Parameter(torch.randn(256, 128).to(torch.bfloat16))
    dense = torch.nn.Parameter(torch.randn(8000, 8).to(torch.bfloat16))
    groups = [
        {"params": [weight], "rank": 32, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"},
        {"params": [dense]},
    ]
    opt = GradNormLoRPAdamW8bit(groups, lr=1e-2)
    before = weight.detach().clone(), dense.detach().clone()
    for _ in range(3):
        weight.grad = torch.randn(256, 128).to(torch.bfloat16)
        dense.grad = torch.randn(8000, 8).to(torch.bfloat16)
        opt.step()
    assert weight.dtype == dense.dtype == torch.bfloat16
    assert opt.state[weight]["exp_avg"].dtype == torch.uint8
    assert not torch.equal(weight.detach(), before[0])
    assert not torch.equal(dense.detach(), before[1])
    assert torch.isfinite(weight.detach().float()).all()


def test_bits_must_be_8_or_32():
    with pytest.raises(ValueError, match="bits=4"):
        GradNormLoRPAdamW([torch.nn.Parameter(torch.randn(3))], bits=4)
