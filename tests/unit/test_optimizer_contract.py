"""GradNormLoRPAdamW keeps the contracts frameworks rely on from ``torch.optim`` (issue #26):
copies that step, non-contiguous and complex tensors, old state dicts, tensor ``lr``, compile.

PyTorch's own generic suite runs in ``test_torch_optim_contract.py``; these are the cases it
found, each compared with ``torch.optim.AdamW`` or with our own eager step.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from gnlorp_dist.optim import GradNormLoRPAdamW

PROJECTED = {"rank": 2, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}


def _projected(params, **kwargs) -> GradNormLoRPAdamW:
    return GradNormLoRPAdamW([{"params": list(params), **PROJECTED}], **kwargs)


def _dense(params, **kwargs) -> GradNormLoRPAdamW:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nothing is projected": on purpose
        optimizer = GradNormLoRPAdamW(list(params), **kwargs)
    return optimizer


def _step(optimizer: GradNormLoRPAdamW) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        optimizer.step()


def _adamw(params, lr=1e-3) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=0.0, foreach=False)


# -- 1. copies and pickles step ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("build", [_dense, _projected], ids=["dense", "projected"])
def test_a_copied_optimizer_steps_as_the_original(how, build):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = build([weight], lr=1e-2)
    grads = [torch.randn(6, 4) for _ in range(5)]
    for grad in grads[:2]:
        weight.grad = grad.clone()
        _step(optimizer)
    if how == "deepcopy":
        copied = copy.deepcopy(optimizer)
    else:
        copied = pickle.loads(pickle.dumps(optimizer))
    (twin,) = copied.param_groups[0]["params"]
    assert twin is not weight and torch.equal(twin, weight)
    assert copied.table.model_params[0][0] is twin  # the copy's table holds the copy's tensor
    for grad in grads[2:]:
        weight.grad, twin.grad = grad.clone(), grad.clone()
        _step(optimizer)
        _step(copied)
    assert torch.equal(twin, weight)
    assert copied.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_a_copy_keeps_the_communicator_and_drops_caches():
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = _projected([weight])
    copied = copy.deepcopy(optimizer)
    assert copied.comm is optimizer.comm
    assert copied.per_layer is None
    assert {k for k in vars(optimizer) if not k.startswith("_")} == {
        k for k in vars(copied) if not k.startswith("_")
    }


# -- 2. non-contiguous parameters and gradients ------------------------------------------------


def _transposed(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(cols, rows).t()


@pytest.mark.parametrize("which", ["param", "grad", "both"])
def test_dense_non_contiguous_tensors_step_as_contiguous_ones(which):
    start = _transposed(6, 4) if which in ("param", "both") else torch.randn(6, 4)
    strided = torch.nn.Parameter(start.clone(memory_format=torch.preserve_format))
    plain = torch.nn.Parameter(start.contiguous())
    theirs = torch.nn.Parameter(start.clone(memory_format=torch.preserve_format))
    assert strided.is_contiguous() == (which == "grad")
    one, two = _dense([strided], lr=1e-2), _dense([plain], lr=1e-2)
    reference = _adamw([theirs], lr=1e-2)
    for _ in range(3):
        grad = _transposed(6, 4) if which in ("grad", "both") else torch.randn(6, 4)
        strided.grad, plain.grad, theirs.grad = grad, grad.contiguous(), grad.clone()
        for optimizer in (one, two):
            _step(optimizer)
        reference.step()
    assert strided.stride() == start.stride()  # updated in place, not replaced
    torch.testing.assert_close(strided, plain, rtol=0, atol=0)
    torch.testing.assert_close(strided, theirs)  # AdamW's lerp_ rounds its moments otherwise


def test_projected_non_contiguous_matches_the_contiguous_run():
    start, grads = _transposed(8, 6), [_transposed(8, 6) for _ in range(4)]
    strided = torch.nn.Parameter(start.clone(memory_format=torch.preserve_format))
    plain = torch.nn.Parameter(start.contiguous())
    one, two = _projected([strided], lr=1e-2), _projected([plain], lr=1e-2)
    for grad in grads:
        strided.grad, plain.grad = grad, grad.contiguous()
        one.step()
        two.step()
    assert not strided.is_contiguous()
    torch.testing.assert_close(strided, plain, rtol=0, atol=0)


def test_channels_last_conv_matches_adamw():
    torch.manual_seed(0)
    ours = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    theirs = copy.deepcopy(ours)
    optimizer, reference = _dense(ours.parameters(), lr=1e-2), _adamw(theirs.parameters(), lr=1e-2)
    for _ in range(3):
        batch = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            model(batch).square().sum().backward()
        _step(optimizer)
        reference.step()
    assert ours.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.bias, theirs.bias)


# -- 3. complex parameters -------------------------------------------------------------------


def test_dense_complex_parameters_step_as_their_real_view():
    start = torch.randn(5, 3, dtype=torch.complex64)
    ours = torch.nn.Parameter(start.clone())
    real = torch.nn.Parameter(torch.view_as_real(start).clone())
    theirs = torch.nn.Parameter(start.clone())
    one, two = _dense([ours], lr=0.1), _dense([real], lr=0.1)
    reference = _adamw([theirs], lr=0.1)
    for _ in range(4):
        grad = torch.randn(5, 3, dtype=torch.complex64)
        ours.grad, real.grad, theirs.grad = grad.clone(), torch.view_as_real(grad), grad.clone()
        for optimizer in (one, two, reference):
            _step(optimizer)
    torch.testing.assert_close(torch.view_as_real(ours), real, rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs)  # |g|^2, not g*g, in the second moment


def test_projected_complex_parameters_are_refused_naming_the_parameter():
    complex_weight = torch.randn(6, 4, dtype=torch.complex64, requires_grad=True)
    group = {"params": [complex_weight], "param_names": ["encoder.w"], **PROJECTED}
    with pytest.raises(ValueError, match=r"encoder\.w.*complex.*without 'rank'"):
        GradNormLoRPAdamW([group])
    optimizer = _projected([torch.nn.Parameter(torch.randn(6, 4))])
    with pytest.raises(ValueError, match="complex"):
        optimizer.add_param_group({"params": [complex_weight], **PROJECTED})


# -- 4. state dicts without our newer group keys -----------------------------------------------


def _stepped_state_dict(params, **kwargs) -> dict:
    optimizer = torch.optim.AdamW(params, **kwargs)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer.state_dict()


def test_an_adamw_state_dict_loads_and_keeps_this_optimizers_bits():
    weight = torch.nn.Parameter(torch.randn(64, 80))
    saved = _stepped_state_dict([weight], lr=1e-3)
    optimizer = _dense([weight], bits=8, min_8bit_size=16)
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["bits"] == 8
    assert optimizer.param_groups[0]["min_8bit_size"] == 16
    weight.grad = torch.randn_like(weight)
    _step(optimizer)
    assert optimizer.state[weight]["step"] == 2


def test_our_state_dict_from_before_the_bits_keys_loads_and_steps():
    weight = torch.nn.Parameter(torch.randn(8, 6))
    optimizer = _projected([weight], bits=8, min_8bit_size=4)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    for group in saved["param_groups"]:
        del group["bits"], group["min_8bit_size"]
    fresh = _projected([weight], bits=8, min_8bit_size=4)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["bits"] == 8
    weight.grad = torch.randn_like(weight)
    fresh.step()
    assert fresh.state[weight]["exp_avg"].dtype == torch.uint8


# -- 5. tensor lr, betas -------------------------------------------------------------------------


@pytest.mark.parametrize("build", [_dense, _projected], ids=["dense", "projected"])
def test_tensor_lr_steps_as_its_float(build):
    start, grads = torch.randn(6, 4), [torch.randn(6, 4) for _ in range(3)]
    as_tensor = torch.nn.Parameter(start.clone())
    as_float = torch.nn.Parameter(start.clone())
    lr = torch.tensor(1e-2, dtype=torch.float64)
    one, two = build([as_tensor], lr=lr), build([as_float], lr=1e-2)
    for grad in grads:
        as_tensor.grad, as_float.grad = grad.clone(), grad.clone()
        _step(one)
        _step(two)
    torch.testing.assert_close(as_tensor, as_float, rtol=0, atol=0)


def test_tensor_lr_with_several_elements_is_refused():
    with pytest.raises(ValueError, match="lr"):
        _dense([torch.nn.Parameter(torch.randn(3))], lr=torch.tensor([1e-3, 1e-3]))


def test_betas_mixing_a_float_and_a_tensor_are_refused():
    weight = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        _dense([weight], betas=(torch.tensor(0.9), 0.999))
    _dense([weight], betas=(torch.tensor(0.9), torch.tensor(0.999)))


# -- 6. torch.compile(optimizer.step) ------------------------------------------------------------


def _inductor_available() -> str | None:
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
    except Exception as error:  # no C++ compiler or inductor backend on this machine
        return f"inductor unavailable on CPU: {type(error).__name__}: {error}"
    return None


def test_compiled_projected_step_matches_eager():
    why = _inductor_available()
    if why:
        pytest.skip(why)
    torch._dynamo.reset()
    torch.manual_seed(0)
    start, grads = torch.randn(8, 6), [torch.randn(8, 6) for _ in range(2)]
    eager_w = torch.nn.Parameter(start.clone())
    compiled_w = torch.nn.Parameter(start.clone())
    eager = _projected([eager_w], lr=1e-3, weight_decay=0.1)
    compiled = _projected([compiled_w], lr=1e-3, weight_decay=0.1)
    compiled_step = torch.compile(compiled.step)
    for t, grad in enumerate(grads):
        eager_w.grad, compiled_w.grad = grad.clone(), grad.clone()
        eager.step()
        # the first step refreshes the subspace (an SVD the eager optimizer runs too)
        (compiled.step if t == 0 else compiled_step)()
    moved = (eager_w - start).abs().max()
    torch.testing.assert_close(compiled_w, eager_w, rtol=1e-5, atol=1e-3 * float(moved))
