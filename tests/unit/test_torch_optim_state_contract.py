"""PyTorch's generic optimizer contract, second half: state dicts, hooks and copies.

The same runner as ``test_torch_optim_contract.py`` (whose docstring lists what is left out and
why), for the checks of PyTorch's ``TestOptimRenewed`` on ``state_dict()`` /
``load_state_dict()`` (deterministic, older and named state dicts, ``weights_only`` loads,
non-tensor steps), the state-dict and step hooks, and ``copy.deepcopy``.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from copy import deepcopy

import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import (
    optims,
)
from torch.testing._internal.common_utils import TestCase, parametrize

from tests.unit.torch_optim_infos import (
    FLOAT,
    OPTIMIZER_INFOS,
    all_inputs,
    conv_bn,
    named,
    quadratic,
    without_names,
)


def _small_params(device, dtype):
    return (
        Parameter(torch.randn(2, 3, device=device, dtype=dtype)),
        Parameter(torch.randn(2, device=device, dtype=dtype)),
        torch.randn(3, device=device, dtype=dtype),
    )


def _conv_step(optimizer, model, inputs):
    optimizer.zero_grad()
    model(inputs).sum().backward()
    optimizer.step()


def _set_test_entry(optimizer):
    optimizer.state["test"] = 1


def _move_test_entry(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def _lr_to_002(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _lr_to_003_in_a_copy(optimizer, state_dict):
    copied = deepcopy(state_dict)
    copied["param_groups"][0]["lr"] = 0.003
    return copied


def _record_load(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


class TestOptimizerStateContract(TestCase):
    def setUp(self):
        super().setUp()
        warnings.filterwarnings("ignore", "GradNormLoRPAdamW: no parameter group")

    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_state_dict_deterministic(
        self, device, dtype, optim_info, is_named_optim0, is_named_optim1
    ):
        weight, bias, inputs = _small_params(device, dtype)
        for optim_input in all_inputs(device, dtype, optim_info):
            kwargs = optim_input.kwargs
            optimizer = optim_info.optim_cls(named([weight, bias], is_named_optim0), **kwargs)
            closure = functools.partial(quadratic, optimizer, weight, bias, inputs)
            for _ in range(10):
                closure()
                optimizer.step()
            with torch.no_grad():
                weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
            optimizer_c = optim_info.optim_cls(named([weight_c, bias_c], is_named_optim1), **kwargs)
            closure_c = functools.partial(quadratic, optimizer_c, weight_c, bias_c, inputs)
            optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
            for _ in range(10):
                closure()
                closure_c()
                optimizer.step()
                optimizer_c.step()
                self.assertEqual(weight, weight_c)
                self.assertEqual(bias, bias_c)
            self.assertEqual(
                without_names(optimizer.state_dict()), without_names(optimizer_c.state_dict())
            )
            optimizer_c.param_groups.extend(optimizer_c.param_groups)
            self.assertEqual(
                without_names(optimizer.state_dict())["param_groups"][-1],
                without_names(optimizer_c.state_dict())["param_groups"][-1],
            )

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_can_load_older_state_dict(self, device, dtype, optim_info):
        for optim_input in all_inputs(device, dtype, optim_info):
            model, inputs = conv_bn(device, dtype)
            optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)
            for _ in range(3):
                _conv_step(optimizer, model, inputs)
            older = deepcopy(optimizer.state_dict())
            for group in older["param_groups"]:
                for flag in optim_info.not_og_supported_flags:
                    group.pop(flag, None)
            optimizer.load_state_dict(older)
            _conv_step(optimizer, model, inputs)

    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_can_load_from_to_named_state_dict(
        self, device, dtype, optim_info, is_named_optim0, is_named_optim1
    ):
        for optim_input in all_inputs(device, dtype, optim_info):
            model, inputs = conv_bn(device, dtype)

            def params(named, model=model):
                return model.named_parameters() if named else model.parameters()

            optimizer = optim_info.optim_cls(params(is_named_optim0), **optim_input.kwargs)
            for _ in range(3):
                _conv_step(optimizer, model, inputs)
            saved = deepcopy(optimizer.state_dict())
            optimizer2 = optim_info.optim_cls(params(is_named_optim1), **optim_input.kwargs)
            optimizer2.load_state_dict(saved)
            _conv_step(optimizer2, model, inputs)
            if is_named_optim0 or is_named_optim1:
                self.assertEqual(
                    optimizer2.state_dict()["param_groups"][0]["param_names"],
                    ["0.weight", "0.bias", "1.weight", "1.bias"],
                )

    @parametrize("is_named_optim", [True, False])
    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_save_load_equality_with_weights_only(self, device, dtype, optim_info, is_named_optim):
        weight, bias, inputs = _small_params(device, dtype)
        for optim_input in all_inputs(device, dtype, optim_info):
            optimizer = optim_info.optim_cls(
                named([weight, bias], is_named_optim), **optim_input.kwargs
            )
            for _ in range(3):
                optimizer.step(functools.partial(quadratic, optimizer, weight, bias, inputs))
            saved = optimizer.state_dict()
            with tempfile.TemporaryFile() as f:
                torch.save(saved, f)
                f.seek(0)
                self.assertEqual(torch.load(f, weights_only=False), saved)
                f.seek(0)
                self.assertEqual(torch.load(f, weights_only=True), saved)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_load_nontensor_step(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        for optim_input in all_inputs(device, dtype, optim_info):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step()
            saved = deepcopy(optimizer.state_dict())
            for state in saved["state"].values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].item()
            optimizer.load_state_dict(saved)
            optimizer.step()

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_state_dict_hooks(self, device, dtype, optim_info):
        """PyTorch's test_state_dict_pre_hook, _post_hook and _pre_post_hook."""
        for optim_input in all_inputs(device, dtype, optim_info):
            param = torch.rand(2, 3, device=device, dtype=dtype, requires_grad=True)
            pre = optim_info.optim_cls([param], **optim_input.kwargs)
            pre.register_state_dict_pre_hook(_set_test_entry)
            self.assertEqual(pre.state_dict()["state"]["test"], 1)
            post = optim_info.optim_cls([param], **optim_input.kwargs)
            post.register_state_dict_post_hook(_move_test_entry)
            self.assertFalse(post.state_dict()["ran_state_dict_pre_hook"])
            both = optim_info.optim_cls([param], **optim_input.kwargs)
            both.register_state_dict_pre_hook(_set_test_entry)
            both.register_state_dict_post_hook(_move_test_entry)
            saved = both.state_dict()
            self.assertNotIn("test", saved["state"])
            self.assertTrue(saved["ran_state_dict_pre_hook"])

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_load_state_dict_hooks(self, device, dtype, optim_info):
        """PyTorch's test_load_state_dict_pre_hook_and_prepend, _post_hook, _pre_post_hook."""
        for optim_input in all_inputs(device, dtype, optim_info):
            param = torch.rand(2, 3, device=device, dtype=dtype, requires_grad=True)
            optimizer = optim_info.optim_cls([param], **optim_input.kwargs)
            saved = optimizer.state_dict()
            optimizer.register_load_state_dict_pre_hook(_lr_to_002)
            optimizer.load_state_dict(saved)
            self.assertEqual(optimizer.param_groups[0]["lr"], 0.002)
            optimizer.register_load_state_dict_pre_hook(_lr_to_003_in_a_copy, prepend=True)
            optimizer.load_state_dict(saved)
            self.assertEqual(optimizer.param_groups[0]["lr"], 0.002)
            for with_pre_hook in (False, True):
                optimizer = optim_info.optim_cls([param], **optim_input.kwargs)
                if with_pre_hook:
                    optimizer.register_load_state_dict_pre_hook(_lr_to_003_in_a_copy)
                optimizer.register_load_state_dict_post_hook(_record_load)
                optimizer.load_state_dict(optimizer.state_dict())
                ran_pre = optimizer.state["ran_load_state_dict_pre_hook2"]
                self.assertEqual(ran_pre, with_pre_hook)
                self.assertTrue(optimizer.state["ran_load_state_dict_post_hook"])

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_step_hooks(self, device, dtype, optim_info):
        """PyTorch's test_step_post_hook and test_step_pre_hook."""
        params = [torch.tensor([1.0, 1.0], device=device, dtype=dtype)]
        for optim_input in all_inputs(device, dtype, optim_info):
            for register, start, expected in (("post", 2, 6), ("pre", 5, 9)):
                optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
                data = [start]

                def hook(opt, args, kwargs, data=data):
                    data[0] += 2

                handle = getattr(optimizer, f"register_step_{register}_hook")(hook)
                optimizer.step()
                optimizer.step()
                self.assertEqual(data[0], expected)
                handle.remove()
                optimizer.step()
                self.assertEqual(data[0], expected)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_step_all_hooks(self, device, dtype, optim_info):
        params = [torch.tensor([1.0, 1.0], device=device, dtype=dtype)]
        for optim_input in all_inputs(device, dtype, optim_info):
            optimizer, sgd, data = (
                optim_info.optim_cls(params, **optim_input.kwargs),
                SGD(params),
                [],
            )

            def record(value, data=data):
                return lambda opt, args, kwargs: data.append(value)

            handles = [
                register_optimizer_step_pre_hook(record(0)),
                register_optimizer_step_post_hook(record(5)),
            ]
            for opt in (optimizer, sgd):
                handles.append(opt.register_step_pre_hook(record(1)))
                handles.append(opt.register_step_post_hook(record(2)))
            optimizer.step()
            self.assertListEqual(data, [0, 1, 2, 5])
            sgd.step()
            optimizer.step()
            self.assertListEqual(data, [0, 1, 2, 5] * 3)
            for handle in handles:
                handle.remove()
            optimizer.step()
            sgd.step()
            self.assertListEqual(data, [0, 1, 2, 5] * 3)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_deepcopy_copies_all_public_attrs(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)

        def public(obj):
            return {k for k in obj.__dict__ if not k.startswith("_")}

        for optim_input in all_inputs(device, dtype, optim_info):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step()
            self.assertEqual(public(optimizer), public(deepcopy(optimizer)))


instantiate_device_type_tests(TestOptimizerStateContract, globals(), only_for="cpu")
