"""``OptimizerInfo`` entries for GradNormLoRPAdamW, for PyTorch's generic optimizer tests.

PyTorch parametrizes its optimizer tests (``TestOptimRenewed`` in its ``test/test_optim.py``) by
``torch.testing._internal.common_optimizers.OptimizerInfo``: how to build the optimizer, which
keyword arguments to try, which errors it raises, which flags are newer than its first release.
These two entries are modelled on AdamW's:

- :data:`DENSE`: ``GradNormLoRPAdamW`` as the tests build it, ``optim_cls(params, **kwargs)``
  (no group carries ``rank``: plain AdamW, complex parameters included);
- :data:`PROJECTED`: :class:`ProjectingGradNormLoRPAdamW`, which puts every real 2-D parameter
  of each group the tests pass into a projected group of its own (GaLore's keys) and the rest
  into a dense one, so the same tests run the projected path; complex parameters are refused
  there (``supports_complex=False``; ``test_optimizer_contract.py`` checks the refusal).

Neither supports ``foreach``/``fused``/``differentiable`` (``supported_impls=()``), ``maximize``,
``amsgrad`` or ``capturable``. ``bits`` and ``min_8bit_size`` are the flags newer than our first
state dicts (``not_og_supported_flags``). The runner is ``test_torch_optim_contract.py``.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
)

from gnlorp_dist.optim import GradNormLoRPAdamW

# Importing torch.testing._internal freezes torch.backends' flags for the whole process (torch's
# own suite sets them only through a context manager); the rest of our pytest session sets them
# directly (gnlorp_dist.device's TF32 switch), so they are unfrozen again, as before the import.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

PROJECTION = {"update_proj_gap": 2, "scale": 0.5, "proj_type": "std"}
"""GaLore's keys for the projected groups (refresh every 2 steps: the tests step 3 to 20)."""
MAX_RANK = 2


def _is_matrix(entry: Any) -> bool:
    tensor = entry[1] if isinstance(entry, tuple) else entry
    return tensor.dim() == 2 and not tensor.is_complex()


def _smallest_side(entries: list[Any]) -> int:
    return min(min((e[1] if isinstance(e, tuple) else e).shape) for e in entries)


def projecting_groups(params: Any) -> list[dict[str, Any]]:
    """Each group the tests pass, split: its real 2-D tensors in a projected group (rank 2, or
    their smallest side), the rest in a dense one with the same options."""
    given = list(params)
    groups = given if given and isinstance(given[0], dict) else [{"params": given}]
    split: list[dict[str, Any]] = []
    for group in groups:
        entries = group["params"]
        entries = [entries] if isinstance(entries, torch.Tensor) else list(entries)
        options = {k: v for k, v in group.items() if k != "params"}
        matrices = [e for e in entries if _is_matrix(e)]
        others = [e for e in entries if not _is_matrix(e)]
        if matrices:
            rank = min(MAX_RANK, _smallest_side(matrices))
            split.append({"params": matrices, "rank": rank, **PROJECTION, **options})
        if others:
            split.append({"params": others, **options})
    return split


class ProjectingGradNormLoRPAdamW(GradNormLoRPAdamW):
    """``GradNormLoRPAdamW`` whose real matrices are projected whatever groups it is given."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(projecting_groups(params), **kwargs)


def optim_inputs(device: Any, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    """AdamW's CPU configurations that apply to us, plus our own options."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="nonzero weight_decay"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.001)}, desc="Tensor lr"),
        OptimizerInput(
            params=None,
            kwargs={"betas": (torch.tensor(0.9), torch.tensor(0.99))},
            desc="Tensor betas",
        ),
        OptimizerInput(params=None, kwargs={"bits": 8, "min_8bit_size": 1}, desc="8-bit moments"),
    ]


def _error(kwargs: dict[str, Any], regex: str, desc: str) -> ErrorOptimizerInput:
    param = torch.nn.Parameter(torch.randn(3, 2))
    return ErrorOptimizerInput(
        OptimizerInput(params=[param], kwargs=kwargs, desc=desc),
        error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR,
        error_type=ValueError,
        error_regex=regex,
    )


def optim_error_inputs(device: Any, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    """AdamW's construction errors, with our messages (they name the value and the fix)."""
    return [
        _error({"lr": -1e-2}, r"lr=-0\.01 must be a number >= 0", "negative lr"),
        _error({"eps": -1e-8}, r"eps=-1e-08 must be >= 0", "negative eps"),
        _error({"betas": (1.0, 0.999)}, r"betas=\(1\.0, 0\.999\) must be two", "beta1 = 1"),
        _error({"betas": (0.9, -0.1)}, r"betas=\(0\.9, -0\.1\) must be two", "negative beta2"),
        _error({"weight_decay": -1.0}, r"weight_decay=-1\.0 must be >= 0", "negative decay"),
        _error({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element", "lr shape"),
        _error(
            {"betas": (torch.tensor(0.9), 0.99)},
            "betas must be either both floats or both Tensors",
            "mixed betas",
        ),
        _error({"lr": float("nan")}, "lr=nan must be finite", "NaN lr"),
        _error({"min_8bit_size": 0}, "min_8bit_size=0 must be an int >= 1", "min_8bit_size"),
    ]


_SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: ReduceLROnPlateau(opt)],
)


def _info(optim_cls: type, *, supports_complex: bool) -> OptimizerInfo:
    return OptimizerInfo(
        optim_cls,
        optim_inputs_func=optim_inputs,
        optim_error_inputs_func=optim_error_inputs,
        scheduler_inputs=_SCHEDULERS,
        supported_impls=(),
        not_og_supported_flags=("bits", "min_8bit_size"),
        supports_complex=supports_complex,
    )


DENSE = _info(GradNormLoRPAdamW, supports_complex=True)
PROJECTED = _info(ProjectingGradNormLoRPAdamW, supports_complex=False)
OPTIMIZER_INFOS = [DENSE, PROJECTED]


# -- what both runners share ---------------------------------------------------------------------

FLOAT = [torch.float32]
"""The dtypes the runners instantiate the tests for."""


def all_inputs(device: Any, dtype: torch.dtype, info: OptimizerInfo) -> list[OptimizerInput]:
    """Every keyword setting of ``info``, with the global ones (lr as a Tensor ...) added."""
    return _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, info)


def quadratic(optimizer: Any, weight: Tensor, bias: Tensor, inputs: Tensor) -> Tensor:
    """The tests' loss, ``|W x + b|^2``, its gradients set; a closure."""
    optimizer.zero_grad()
    loss = (weight.mv(inputs) + bias).pow(2).sum()
    loss.backward()
    return loss


def named(params: Any, with_names: bool) -> Any:
    """``params``, or ``(name, param)`` pairs when ``with_names``."""
    return [(f"name{i}", p) for i, p in enumerate(params)] if with_names else params


def conv_bn(device: Any, dtype: torch.dtype) -> tuple[torch.nn.Module, Tensor]:
    """A Conv2d + BatchNorm2d model and an input for it (the tests' channels_last case)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
    return model.to(device=device, dtype=dtype), torch.rand(1, 4, 16, 16, device=device)


def without_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` without the groups' ``param_names``."""
    copied = deepcopy(state_dict)
    for group in copied["param_groups"]:
        group.pop("param_names", None)
    return copied
