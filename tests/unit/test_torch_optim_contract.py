"""PyTorch's generic optimizer contract, run on GradNormLoRPAdamW (dense and projected).

Our runner of the checks in PyTorch's ``TestOptimRenewed`` (``test/test_optim.py``, 2.x), over
torch's own ``OptimizerInfo`` machinery (``torch.testing._internal.common_optimizers``: the
``optims`` parametrizer and the configurations with their global flags) and our two entries in
``torch_optim_infos.py``. Each test keeps PyTorch's name and asserts what PyTorch's asserts.

Left out, with the reason:

- ``test_foreach_matches_forloop``, ``test_fused_matches_forloop``, ``test_fused_*``,
  ``test_foreach_large_tensor``, ``test_peak_memory_foreach``, ``test_mixed_device_dtype``,
  ``test_set_default_dtype_works_with_foreach``, ``test_defaults_changed_to_foreach``,
  ``test_cpu_load_state_dict``: foreach/fused/capturable kernels, which we do not have;
- ``test_errors`` runs with OUR error inputs (``optim_error_inputs``): AdamW's exact texts are
  not ours;
- ``test_rosenbrock_sparse`` (sparse gradients: not supported), ``test_second_order_optims_*``
  (closure-only optimizers), and the CUDA-only ``*_multigpu`` / ``test_state_dict_with_cuda_params``.
"""

from __future__ import annotations

import functools
import warnings
from copy import deepcopy

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    TensorTracker,
    optims,
)
from torch.testing._internal.common_utils import TestCase, parametrize

from tests.unit.torch_optim_infos import (
    FLOAT,
    OPTIMIZER_INFOS,
    all_inputs,
    quadratic,
)


def _linear_params(device, dtype, contiguous=True):
    if contiguous:
        return (
            Parameter(torch.randn(10, 5, device=device, dtype=dtype)),
            Parameter(torch.randn(10, device=device, dtype=dtype)),
        )
    return (
        Parameter(torch.randn(10, 5, 2, device=device, dtype=dtype)[..., 0]),
        Parameter(torch.randn(10, 2, device=device, dtype=dtype)[..., 0]),
    )


def _step_scheduler(scheduler, loss):
    scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()


class TestOptimizerContract(TestCase):
    def setUp(self):
        super().setUp()
        # "nothing is projected": the dense entry is plain AdamW on purpose
        warnings.filterwarnings("ignore", "GradNormLoRPAdamW: no parameter group")

    @optims(OPTIMIZER_INFOS)
    def test_optim_infos_do_not_specify_global_cliquey_kwargs(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            flags = ("foreach", "fused", "differentiable")
            self.assertFalse(any(flag in optim_input.kwargs for flag in flags))

    @optims(OPTIMIZER_INFOS)
    def test_errors(self, device, dtype, optim_info):
        for error in optim_info.optim_error_inputs_func(device=device, dtype=dtype):
            given = error.optimizer_error_input
            self.assertEqual(error.error_on, OptimizerErrorEnum.CONSTRUCTION_ERROR)
            with self.assertRaisesRegex(error.error_type, error.error_regex):
                optim_info.optim_cls(given.params, **given.kwargs)

    @parametrize("contiguous", [True, False])
    @parametrize("with_lrsched", [True, False])
    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_forloop_goes_right_direction(
        self, device, dtype, optim_info, contiguous, with_lrsched
    ):
        for constructors in optim_info.scheduler_inputs if with_lrsched else [[]]:
            for optim_input in optim_info.optim_inputs_func(device=device):
                weight, bias = _linear_params(device, dtype, contiguous)
                inputs = torch.randn(5, device=device, dtype=dtype)
                optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
                schedulers = [make(optimizer) for make in constructors]
                closure = functools.partial(quadratic, optimizer, weight, bias, inputs)
                initial = closure().item()
                for _ in range(20):
                    loss = closure()
                    optimizer.step()
                    for scheduler in schedulers:
                        _step_scheduler(scheduler, loss)
                self.assertLess(closure().item(), initial)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_param_group_with_lrscheduler_goes_right_direction(self, device, dtype, optim_info):
        for constructors in optim_info.scheduler_inputs:
            weight, bias = _linear_params(device, dtype)
            inputs = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
            schedulers = [make(optimizer) for make in constructors]
            closure = functools.partial(quadratic, optimizer, weight, bias, inputs)
            initial = closure().item()
            for _ in range(20):
                loss = optimizer.step(closure)
                for scheduler in schedulers:
                    _step_scheduler(scheduler, loss)
            self.assertLess(closure().item(), initial)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_tensor_lr(self, device, dtype, optim_info):
        for optim_input in all_inputs(device, dtype, optim_info):
            weight, bias = _linear_params(device, dtype)
            weight_c = weight.detach().clone().requires_grad_(True)
            bias_c = bias.detach().clone().requires_grad_(True)
            inputs = torch.randn(5, device=device, dtype=dtype)
            kwargs = dict(optim_input.kwargs, lr=1e-3)
            as_float = optim_info.optim_cls([weight, bias], **kwargs)
            as_tensor = optim_info.optim_cls(
                [weight_c, bias_c], **dict(kwargs, lr=torch.tensor(1e-3))
            )
            for _ in range(5):
                quadratic(as_float, weight, bias, inputs)
                quadratic(as_tensor, weight_c, bias_c, inputs)
                as_float.step()
                as_tensor.step()
                self.assertEqual(weight, weight_c)
                self.assertEqual(bias, bias_c)

    @optims([o for o in OPTIMIZER_INFOS if o.supports_complex], dtypes=[torch.complex64])
    def test_complex(self, device, dtype, optim_info):
        for optim_input in all_inputs(device, dtype, optim_info):
            complex_params = [
                torch.randn(10, 5, device=device, dtype=dtype, requires_grad=True),
                torch.randn(10, device=device, dtype=dtype, requires_grad=True),
                torch.randn(10, 5, device=device, dtype=torch.float32, requires_grad=True),
            ]
            real_params = [
                (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                for p in complex_params
            ]
            complex_optimizer = optim_info.optim_cls(complex_params, **optim_input.kwargs)
            real_optimizer = optim_info.optim_cls(real_params, **optim_input.kwargs)
            real_steps, complex_steps = [], []
            for _ in range(3):
                for real, twin in zip(real_params, complex_params, strict=True):
                    real.grad = torch.randn_like(real)
                    twin.grad = torch.view_as_complex(real.grad) if twin.is_complex() else real.grad
                    real_steps.append(real.detach().clone())
                    complex_steps.append(
                        torch.view_as_real_copy(twin.detach())
                        if twin.is_complex()
                        else twin.detach().clone()
                    )
                real_optimizer.step()
                complex_optimizer.step()
            as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
            self.assertEqual(real_params, as_real)
            self.assertEqual(complex_steps, real_steps)

    @optims([o for o in OPTIMIZER_INFOS if o.supports_complex], dtypes=[torch.complex64])
    def test_complex_2d(self, device, dtype, optim_info):
        def rosenbrock(tensor):
            x, y = tensor
            return (1 - x) ** 2 + 100 * (y - x**2) ** 2

        for optim_input in all_inputs(device, dtype, optim_info):
            if optim_input.kwargs.get("bits") == 8:
                # 8-bit moments share a scale per block of a tensor's elements: a complex
                # tensor's blocks mix real and imaginary parts, two real tensors' cannot (so they
                # differ by the quantisation error). test_complex, on the real view, runs 8-bit.
                continue
            a1 = torch.randn(2, device=device, dtype=dtype, requires_grad=True)
            a1_real = a1.real.detach().clone().requires_grad_()
            a1_imag = a1.imag.detach().clone().requires_grad_()
            optim1 = optim_info.optim_cls([a1], **optim_input.kwargs)
            optim2 = optim_info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
            tracked = [TensorTracker() for _ in range(5)]
            for _ in range(3):
                optim1.zero_grad()
                loss = rosenbrock(a1).abs()
                loss.backward()
                for tracker, value in zip(
                    tracked, (a1.real, a1.imag, a1.grad.real, a1.grad.imag, loss)
                ):
                    tracker.add(value)
                optim2.zero_grad()
                tracked[0].pop_check_set(a1_real, self)
                tracked[1].pop_check_set(a1_imag, self)
                loss2 = rosenbrock(torch.complex(a1_real, a1_imag)).abs()
                tracked[4].pop_check_set(loss2, self)
                loss2.backward()
                tracked[2].pop_check_set(a1_real.grad, self)
                tracked[3].pop_check_set(a1_imag.grad, self)
                optim1.step()
                optim2.step()
                self.assertEqual(a1.real, a1_real)
                self.assertEqual(a1.imag, a1_imag)
            self.assertTrue(all(tracker.all_popped() for tracker in tracked))

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_param_groups_weight_decay(self, device, dtype, optim_info):
        for optim_input in all_inputs(device, dtype, optim_info):
            weight, bias = _linear_params(device, dtype)
            inputs = torch.randn(5, device=device, dtype=dtype)
            bias_kwargs = dict(deepcopy(optim_input.kwargs), weight_decay=0.0)
            optimizer = optim_info.optim_cls(
                [dict(params=[weight], **optim_input.kwargs), dict(params=[bias], **bias_kwargs)]
            )
            initial = (weight.mv(inputs) + bias).pow(2).sum().item()
            for _ in range(20):
                loss = quadratic(optimizer, weight, bias, inputs)
                optimizer.step()
            self.assertLess(loss.item(), initial)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_param_groups_lr(self, device, dtype, optim_info):
        for optim_input in all_inputs(device, dtype, optim_info):
            if "lr" not in optim_input.kwargs or optim_input.kwargs["lr"] == 0:
                optim_input.kwargs["lr"] = 1e-3
            weight, bias = _linear_params(device, dtype)
            irrelevant = Parameter(torch.randn(2, device=device, dtype=dtype))
            irrelevant_clone = irrelevant.clone()
            inputs = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_info.optim_cls(
                [dict(params=[weight, bias], **optim_input.kwargs), dict(params=[irrelevant])],
                lr=1e-28,
            )
            initial = (weight.mv(inputs) + bias).pow(2).sum().item()
            for _ in range(20):
                loss = quadratic(optimizer, weight, bias, inputs)
                irrelevant.grad = torch.rand_like(irrelevant)
                optimizer.step()
            self.assertLess(loss.item(), initial)
            self.assertEqual(irrelevant, irrelevant_clone)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        params = [torch.randn(2, 3, device=device, dtype=dtype) for _ in range(2)]
        old = [p.clone() for p in params]
        for optim_input in all_inputs(device, dtype, optim_info):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            optimizer.step(lambda: torch.tensor([1], device=device, dtype=dtype))
        self.assertEqual(params, old)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        param = torch.randn(5, 1, device=device, dtype=dtype, requires_grad=True)
        old = param.detach().clone()
        for optim_input in all_inputs(device, dtype, optim_info):
            if optim_input.kwargs.get("weight_decay", 0) != 0:
                continue  # decay moves the weights whatever the gradient
            optimizer = optim_info.optim_cls([param], **optim_input.kwargs)
            param.grad = torch.zeros_like(param)
            optimizer.step(lambda: torch.tensor([1], device=device, dtype=dtype))
            self.assertEqual(old, param)

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_optimizer_can_be_printed(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for optim_input in all_inputs(device, dtype, optim_info):
            self.assertIn(
                optim_info.optim_cls.__name__,
                repr(optim_info.optim_cls(params, **optim_input.kwargs)),
            )

    @optims(OPTIMIZER_INFOS, dtypes=FLOAT)
    def test_non_empty_state(self, device, dtype, optim_info):
        model = torch.nn.Linear(5, 5).to(device=device, dtype=dtype)
        for optim_input in optim_info.optim_inputs_func(device=device):
            optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)
            optimizer.zero_grad()
            model(torch.rand(2, 5, device=device, dtype=dtype)).sum().backward()
            optimizer.step()
            for state in optimizer.state.values():
                self.assertGreater(len(state), 0)


instantiate_device_type_tests(TestOptimizerContract, globals(), only_for="cpu")
