"""A logged warning when another optimizer trains the parameters of a GradNormLoRPAdamW that
never stepped.

``transformers.Trainer(optimizers=(GradNormLoRPAdamW(...), None))`` under
``TrainingArguments(deepspeed=...)`` drops the given optimizer: DeepSpeed trains torch AdamW,
the run looks normal, and nothing says so. From its construction until its first ``step()``,
each GradNormLoRPAdamW is watched: a few elements of each of its parameters are kept, and after
any OTHER torch optimizer's step (torch's global step hook, installed when something is
watched first) they are compared with the parameters' current bytes and shapes. If they changed, one
warning is logged (``gnlorp_dist.optim.never_stepped``) naming the other optimizer and the fix,
and the optimizer is no longer watched. Its own first ``step()`` (or per-layer updates attached
to it) ends the watch at no further cost.

Under DeepSpeed ZeRO 1/2 the model's weights are written back after the engine's step, so the
change shows at the other optimizer's second step; under ZeRO-3 the weights are partitioned
(their shapes change) before the first.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from gnlorp_dist.optim.spec import group_params

__all__ = [
    "ParameterFingerprint",
    "another_optimizer_trains_warning",
    "fingerprint",
    "parameters_changed",
    "watch_until_first_step",
]

SAMPLE_ELEMENTS = 8
"""Elements kept per parameter: the first ones of its first row (no copy of the tensor)."""

_logger = logging.getLogger(__name__)
_watched: weakref.WeakKeyDictionary[torch.optim.Optimizer, ParameterFingerprint] = (
    weakref.WeakKeyDictionary()
)
_hook: list[RemovableHandle] = []
"""The global step hook's handle (at most one). Installed with the first watch and never removed:
removing it from inside the hook would change torch's hook dict while torch loops over it, and
once nothing is watched it costs one empty loop per step."""


@dataclass(frozen=True, kw_only=True)
class ParameterFingerprint:
    """What a watched optimizer's parameters looked like when it was built."""

    params: tuple[Tensor, ...]
    """The parameters themselves (the optimizer holds them anyway)."""
    shapes: tuple[tuple[int, ...], ...]
    """Each parameter's shape (ZeRO-3 partitioning empties the module's tensors)."""
    samples: tuple[Tensor | None, ...]
    """Each parameter's first elements as bytes, on its device; None where not read (a tensor
    subclass such as FSDP2's DTensor, whose indexing may communicate, or a meta tensor)."""


def _sample(param: Tensor) -> Tensor | None:
    """The first :data:`SAMPLE_ELEMENTS` elements of ``param``'s first row, as bytes."""
    tensor = param.detach()
    if type(tensor) is not Tensor or tensor.is_meta:
        return None
    if tensor.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=tensor.device)
    row = tensor.reshape(1) if tensor.dim() == 0 else tensor
    while row.dim() > 1:
        row = row[0]
    return row[:SAMPLE_ELEMENTS].contiguous().view(torch.uint8).clone()


def fingerprint(params: list[Tensor]) -> ParameterFingerprint:
    """The fingerprint of ``params`` now."""
    return ParameterFingerprint(
        params=tuple(params),
        shapes=tuple(tuple(p.shape) for p in params),
        samples=tuple(_sample(p) for p in params),
    )


def parameters_changed(before: ParameterFingerprint) -> bool:
    """Whether any parameter's shape or sampled bytes differ from ``before``."""
    if tuple(tuple(p.shape) for p in before.params) != before.shapes:
        return True
    for param, sample in zip(before.params, before.samples, strict=True):
        if sample is not None and not torch.equal(_sample(param), sample):
            return True
    return False


def another_optimizer_trains_warning(ours: str, other: str) -> str:
    """The warning: ``ours`` never stepped while ``other`` changed its parameters."""
    return (
        f"{ours} has not stepped, yet {other}.step() just changed its parameters: another "
        "optimizer is training this model, not this one. transformers.Trainer(optimizers=("
        f"{ours}(...), None)) with TrainingArguments(deepspeed=...) does this (the Trainer drops "
        "the given optimizer and DeepSpeed trains torch AdamW). Use gnlorp_dist.integrations."
        "transformers.GradNormLoRPTrainer (it builds the optimizer in create_optimizer, which "
        "DeepSpeed uses), or Trainer(optimizer_cls_and_kwargs=gnlorp_optimizer_cls_and_kwargs("
        "model, args, config)) from the same module."
    )


def watch_until_first_step(optimizer: torch.optim.Optimizer) -> None:
    """Watch ``optimizer`` (just built) until its first ``step()``; see the module docstring."""
    params = [p for group in optimizer.param_groups for p in group_params(group)]
    _watched[optimizer] = fingerprint(params)
    if not _hook:
        _hook.append(register_optimizer_step_post_hook(_after_any_step))


def _stepping_itself(optimizer: Any) -> bool:
    # Per-layer mode updates inside backward and never calls step().
    return getattr(optimizer, "_per_layer", None) is not None


def _after_any_step(stepped: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """torch's global post-step hook: end the watch of ``stepped``; check the others."""
    _watched.pop(stepped, None)
    for optimizer, before in list(_watched.items()):
        if _stepping_itself(optimizer):
            del _watched[optimizer]
        elif parameters_changed(before):
            del _watched[optimizer]
            _logger.warning(
                another_optimizer_trains_warning(type(optimizer).__name__, type(stepped).__name__)
            )
