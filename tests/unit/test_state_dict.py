"""One process: the state dict's format and refusals, and the step-time warnings and refusals."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, merge_weight_norm
from gnlorp_dist.optim import state_dict as state_io
from gnlorp_dist.optim.comm import LocalCommunicator, gradient_checksum, ranks_disagree
from gnlorp_dist.optim.reshard import join_row_blocks, join_states, moments_state, rows_of_state


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    projected = [nn.Parameter(torch.randn(24, 16, generator=gen)) for _ in range(2)]
    dense = [nn.Parameter(torch.randn(128, 40, generator=gen)), nn.Parameter(torch.randn(16))]
    return projected, dense


def _groups(projected, dense):
    return [
        {"params": projected, "rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"},
        {"params": dense},
    ]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)


def _trained(bits=32, steps=4):
    projected, dense = _params()
    optimizer = GradNormLoRPAdamW(_groups(projected, dense), lr=1e-2, bits=bits)
    for step in range(steps):
        _grads(projected + dense, step)
        optimizer.step()
    return projected + dense, optimizer


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_is_marked_loads_weights_only_and_resumes_bitwise(bits):
    params, optimizer = _trained(bits)
    saved = _round_trip(optimizer.state_dict())
    assert saved["gnlorp"] == {"format": 1, "consolidated": True, "world_size": 1}
    resumed = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = GradNormLoRPAdamW(_groups(resumed[:2], resumed[2:]), lr=1e-2, bits=bits)
    fresh.load_state_dict(saved)
    for step in range(4, 8):  # step 6 refreshes the subspaces
        _grads(params, step)
        _grads(resumed, step)
        optimizer.step()
        fresh.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_consolidate_on_one_process_is_the_state_dict():
    _params_, optimizer = _trained()
    consolidated = optimizer.consolidate_state_dict()
    plain = optimizer.state_dict()
    assert consolidated["gnlorp"] == plain["gnlorp"]
    assert sorted(consolidated["state"]) == sorted(plain["state"])
    for index, state in plain["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(consolidated["state"][index][key], value)


def test_a_shard_of_another_rank_or_world_size_is_refused():
    _params_, optimizer = _trained()
    shard = dict(optimizer.state_dict())
    shard["gnlorp"] = state_io.marker(consolidated=False, rank=1, world_size=2)
    with pytest.raises(ValueError, match="only rank 1's shard of a 2-rank job .* rank 0 of 1"):
        _trained(steps=0)[1].load_state_dict(shard)


def test_an_unmarked_shard_of_an_older_version_is_refused():
    _params_, optimizer = _trained()
    old = {k: v for k, v in optimizer.state_dict().items() if k != "gnlorp"}
    # An older 2-rank save: rank 0 held the first 64 rows of the dense matrix (index 2).
    old["state"][2] = {
        "step": 4,
        "exp_avg": old["state"][2]["exp_avg"][:64],
        "exp_avg_sq": old["state"][2]["exp_avg_sq"][:64],
    }
    with pytest.raises(ValueError, match="no 'gnlorp' entry.*\\(64, 40\\).*\\(128, 40\\)"):
        _trained(steps=0)[1].load_state_dict(old)


def test_an_unmarked_whole_state_of_one_process_still_loads():
    _params_, optimizer = _trained()
    old = {k: v for k, v in optimizer.state_dict().items() if k != "gnlorp"}
    fresh = _trained(steps=0)[1]
    fresh.load_state_dict(old)
    assert fresh.state_dict()["state"][2]["step"] == 4


def test_another_format_version_is_refused():
    _params_, optimizer = _trained()
    saved = optimizer.state_dict()
    saved["gnlorp"] = {**saved["gnlorp"], "format": 99}
    with pytest.raises(ValueError, match="format 99"):
        _trained(steps=0)[1].load_state_dict(saved)


def test_arrival_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(state_io.TIMEOUT_ENV, raising=False)
    assert state_io.arrival_timeout_s() == 60.0
    monkeypatch.setenv(state_io.TIMEOUT_ENV, "2.5")
    assert state_io.arrival_timeout_s() == 2.5
    monkeypatch.setenv(state_io.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="GNLORP_STATE_DICT_TIMEOUT_S='soon'"):
        state_io.arrival_timeout_s()
    assert LocalCommunicator().all_ranks_arrive("state_dict", 1.0)


@pytest.mark.parametrize("bits", [32, 8])
def test_row_blocks_join_and_cut_back(bits):
    gen = torch.Generator().manual_seed(1)
    exp_avg, exp_avg_sq = torch.randn(300, 40, generator=gen), torch.rand(300, 40, generator=gen)
    whole = moments_state(7, exp_avg, exp_avg_sq, bits, torch.float32)
    # 150 x 40 elements: not a whole number of 8-bit blocks, so 8-bit moments are re-quantised.
    blocks = [(0, 150, rows_of_state(whole, 0, 150, bits, torch.float32))]
    blocks.append((150, 300, rows_of_state(whole, 150, 300, bits, torch.float32)))
    step, joined_m, joined_v = join_row_blocks(list(reversed(blocks)), bits)
    assert step == 7
    if bits == 32:
        assert torch.equal(joined_m, exp_avg) and torch.equal(joined_v, exp_avg_sq)
        assert whole["exp_avg"].dtype == torch.float32
    else:  # quantised over other blocks: within the 8-bit code's resolution
        assert whole["exp_avg"].dtype == torch.uint8
        assert float((joined_m - exp_avg).abs().max()) < 0.05 * float(exp_avg.abs().max())
    with pytest.raises(ValueError, match="do not tile"):
        join_row_blocks(blocks[:1] + [(160, 300, blocks[1][2])], bits)


def test_aligned_eight_bit_row_blocks_are_cut_and_joined_code_for_code():
    gen = torch.Generator().manual_seed(2)
    exp_avg, exp_avg_sq = torch.randn(256, 32, generator=gen), torch.rand(256, 32, generator=gen)
    whole = moments_state(3, exp_avg, exp_avg_sq, 8, torch.float32)
    # 128 rows x 32 = 16 blocks of 256 elements each, and 8-bit on their own (>= 4096).
    halves = [(0, 128), (128, 256)]
    pieces = [(a, b, rows_of_state(whole, a, b, 8, torch.float32)) for a, b in halves]
    assert all(piece["exp_avg_absmax"].numel() == 16 for _a, _b, piece in pieces)
    joined = join_states(pieces, 8, torch.float32)
    assert sorted(joined) == sorted(whole)
    for key, value in whole.items():
        assert torch.equal(joined[key], value) if torch.is_tensor(value) else joined[key] == value


def test_gradient_checksums_tell_equal_from_different_gradients():
    grads = [torch.randn(8, 5), torch.randn(7)]
    checksum = gradient_checksum(grads, torch.device("cpu"))
    assert checksum.dtype == torch.float64
    same = [2 * float(c) for c in checksum], [2 * float(c) ** 2 for c in checksum]
    assert not ranks_disagree(*same, world_size=2)
    other = gradient_checksum([g * 1.01 for g in grads], torch.device("cpu"))
    totals = [float(a + b) for a, b in zip(checksum, other)]
    squares = [float(a**2 + b**2) for a, b in zip(checksum, other)]
    assert ranks_disagree(totals, squares, world_size=2)


def test_rank_less_groups_warn_once_with_the_fix():
    params = [nn.Parameter(torch.randn(8, 4))]
    optimizer = GradNormLoRPAdamW(params, lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            _grads(params, step)
            optimizer.step()
    messages = [str(w.message) for w in caught if "carries 'rank'" in str(w.message)]
    assert len(messages) == 1
    assert "projected_param_groups" in messages[0] and "GradNormLoRPTrainer" in messages[0]
    assert caught[0].filename == __file__  # points at the caller's step()


def test_projected_groups_do_not_warn():
    projected, dense = _params()
    optimizer = GradNormLoRPAdamW(_groups(projected, dense), lr=1e-2)
    _grads(projected + dense, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()


@pytest.mark.filterwarnings("ignore:GradNormLoRPAdamW. no parameter group")
def test_step_on_parameters_merge_weight_norm_removed_is_refused():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8))
    model.add_module("o_proj", nn.Linear(8, 4))
    model = apply_weight_norm(model, target_modules=["q_proj", "o_proj"])
    names = [name for name, _p in model.named_parameters()]
    params = list(model.parameters())
    optimizer = GradNormLoRPAdamW([{"params": params, "param_names": names}], lr=1e-2)
    merge_weight_norm(model)
    model(torch.randn(3, 8)).sum().backward()
    with pytest.raises(ValueError, match="removed from the model by gnlorp_dist.merge_weight_norm"):
        optimizer.step()
