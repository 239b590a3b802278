"""8-bit moments: one block grid per tensor, chunked (fused) updates, agreed shared blocks.

The principled quantities: the chunked update writes exactly the codes a whole-tensor
dequantise-update-requantise writes (same element-wise math); runs of a tensor cut anywhere,
with their shared blocks' scales agreed, hold exactly one process's codes; no float32 tensor
as large as a moment is ever created by an 8-bit update.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnlorp_dist import GradNormLoRPAdamW
from gnlorp_dist.optim import quantized
from gnlorp_dist.optim.dense import update_dense_block
from gnlorp_dist.optim.functional import dense_adamw_step
from gnlorp_dist.optim.quantized import (
    BLOCK_SIZE,
    MOMENT_KEYS,
    SIGNED,
    MomentStore,
    dequantize_8bit,
    quantize_8bit,
    settle_shared,
)
from gnlorp_dist.optim.reshard import cut_run, join_runs
from gnlorp_dist.optim.spec import MomentSpec, StepHyperparameters

pytest.importorskip("bitsandbytes")

MOMENTS = MomentSpec(bits=8, min_8bit_size=1024)
HYPER = StepHyperparameters(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def _moments(numel, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=gen) * 1e-2, torch.rand(numel, generator=gen) * 1e-4


def _whole_reference(state, param, grad, step):
    """The update as one whole dequantise-update-requantise (the pre-chunk 8-bit path)."""
    m = dequantize_8bit(state["exp_avg"], state["exp_avg_absmax"], signed=True)
    v = dequantize_8bit(state["exp_avg_sq"], state["exp_avg_sq_absmax"], signed=False)
    dense_adamw_step(
        param, grad, m, v, step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01
    )
    return {
        "exp_avg": quantize_8bit(m, signed=True),
        "exp_avg_sq": quantize_8bit(v, signed=False),
    }


@pytest.mark.parametrize("chunk", [BLOCK_SIZE * 3, 1 << 18])
def test_chunked_update_writes_the_whole_tensor_codes(monkeypatch, chunk):
    monkeypatch.setattr(quantized, "CHUNK_NUMEL", chunk)
    numel = 256 * 40 + 77  # a partial last block
    exp_avg, exp_avg_sq = _moments(numel, 0)
    state = {"step": 3}
    MomentStore(state, 8).set_values(exp_avg, exp_avg_sq)
    reference_state = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    param = torch.randn(numel)
    grad = torch.randn(numel) * 1e-2
    expected_param = param.clone()
    expected = _whole_reference(reference_state, expected_param, grad, step=4)
    assert update_dense_block(state, MOMENTS, HYPER, param, grad) == []
    assert state["step"] == 4
    assert torch.equal(param, expected_param)
    for key in MOMENT_KEYS:
        codes, absmax = expected[key]
        assert torch.equal(state[key], codes), key
        assert torch.equal(state[f"{key}_absmax"], absmax), key


def _run_updates(offset, numel, total, values, grad):
    """One run's update of the moments ``values`` (whole-tensor floats) at ``offset``."""
    state = {"step": 1}
    whole = {}
    for key, value in zip(MOMENT_KEYS, values):
        codes, absmax = quantize_8bit(value, signed=SIGNED[key])
        whole[key] = (codes, absmax)
    first, stop = quantized.block_span(offset, numel)
    for key in MOMENT_KEYS:
        state[key] = whole[key][0][offset : offset + numel].clone()
        state[f"{key}_absmax"] = whole[key][1][first:stop].clone()
    param = torch.zeros(numel)
    shared = update_dense_block(
        state,
        MOMENTS,
        HYPER,
        param,
        grad[offset : offset + numel],
        param_numel=total,
        offset=offset,
    )
    return state, shared


@pytest.mark.parametrize("cuts", [(0, 300, 1000, 2048 + 5), (0, 17, 40, 2100)])
def test_runs_cut_inside_blocks_hold_one_process_codes_once_scales_agree(monkeypatch, cuts):
    monkeypatch.setattr(quantized, "CHUNK_NUMEL", BLOCK_SIZE * 2)  # several chunks per run
    total = cuts[-1]
    values = _moments(total, 1)
    grad = torch.randn(total, generator=torch.Generator().manual_seed(2)) * 1e-2
    whole_state, whole_shared = _run_updates(0, total, total, values, grad)
    assert whole_shared == []
    runs = [(a, b - a) for a, b in zip(cuts, cuts[1:])]
    results = [_run_updates(start, numel, total, values, grad) for start, numel in runs]
    shared = [item for _state, items in results for item in items]
    assert shared, "the cuts fall inside blocks: some blocks are shared"
    # What the all-reduce computes: each shared block's scale is its holders' largest absmax.
    agreed: dict = {}
    for item in shared:
        for key in MOMENT_KEYS:
            scale = torch.as_tensor(item.absmax[key])
            agreed[(item.block, key)] = torch.maximum(agreed.get((item.block, key), scale), scale)
    for _state, items in results:
        settle_shared(items, agreed)
    pieces = [(start, numel, state) for (start, numel), (state, _) in zip(runs, results)]
    joined = join_runs(pieces, 8, torch.float32)
    for key in MOMENT_KEYS:
        assert torch.equal(joined[key], whole_state[key]), key
        assert torch.equal(joined[f"{key}_absmax"], whole_state[f"{key}_absmax"]), key
    # And cutting the whole state gives each run's state back, code for code.
    for (start, numel), (state, _) in zip(runs, results):
        cut = cut_run(whole_state, start, numel, 8, torch.float32)
        for key in MOMENT_KEYS:
            assert torch.equal(cut[key], state[key])
            assert torch.equal(cut[f"{key}_absmax"], state[f"{key}_absmax"])


class _LargestFloat32(TorchDispatchMode):
    """The largest float32 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_8bit_step_never_materialises_a_whole_float32_moment():
    dense = torch.nn.Parameter(torch.randn(2048, 512, dtype=torch.bfloat16))
    matrix = torch.nn.Parameter(torch.randn(512, 256, dtype=torch.bfloat16))
    groups = [
        {"params": [matrix], "rank": 128, "update_proj_gap": 10, "scale": 0.25},
        {"params": [dense]},
    ]
    groups[0]["proj_type"] = "std"
    optimizer = GradNormLoRPAdamW(groups, lr=1e-3, bits=8)
    for _ in range(2):  # the second step reads codes written by the first
        dense.grad = torch.randn_like(dense)
        matrix.grad = torch.randn_like(matrix)
        with _LargestFloat32() as mode:
            optimizer.step()
    assert optimizer.state[dense]["exp_avg"].dtype == torch.uint8
    assert optimizer.state[matrix]["exp_avg"].dtype == torch.uint8
    low_rank = 512 * 128
    # The refresh's float32 SVD and the low-rank gradient (whose buffer takes the direction)
    # are the only float32 tensors of a moment's size or more; the dense moments (1M elements)
    # only ever exist as chunks.
    assert mode.largest <= max(quantized.CHUNK_NUMEL + BLOCK_SIZE, 512 * 256), mode.largest
    assert dense.numel() > 2 * mode.largest and low_rank <= mode.largest


def test_min_8bit_size_decides_which_tensors_are_8bit():
    small = torch.nn.Parameter(torch.randn(40, 20))  # 800 elements: float by default
    for min_size, dtype in ((4096, torch.float32), (256, torch.uint8)):
        optimizer = GradNormLoRPAdamW([small], bits=8, min_8bit_size=min_size)
        small.grad = torch.randn_like(small)
        optimizer.step()
        assert optimizer.state[small]["exp_avg"].dtype == dtype
    with pytest.raises(ValueError, match="min_8bit_size=0"):
        GradNormLoRPAdamW([small], bits=8, min_8bit_size=0)


def test_a_float_state_loaded_into_an_8bit_tensor_is_read_exactly_and_quantised():
    numel = 5000
    exp_avg, exp_avg_sq = _moments(numel, 4)
    param, grad = torch.randn(numel), torch.randn(numel) * 1e-2
    float_state = {"step": 2, "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    copy = {"step": 2, "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    expected_param = param.clone()
    update_dense_block(copy, replace(MOMENTS, bits=32), HYPER, expected_param, grad)
    update_dense_block(float_state, MOMENTS, HYPER, param, grad)
    assert torch.equal(param, expected_param)  # the float values, not codes, fed the step
    assert float_state["exp_avg"].dtype == torch.uint8
