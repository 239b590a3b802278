"""One training step without an engine: gradient accumulation, clipping, the optimizer step.

(With ``--deepspeed`` the engine's step is in :mod:`gnlorp_dist.training.deepspeed_step`.)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from gnlorp_dist.device import autocast_context
from gnlorp_dist.optim.adamw import GradNormLoRPAdamW
from gnlorp_dist.optim.comm import non_finite_count


@dataclass(kw_only=True)
class StepStats:
    loss: float
    """Mean loss over the step's micro-batches."""
    lr: float
    """Learning rate the step used."""
    grad_norm: float | None
    """Gradient norm before clipping (None when clipping is off)."""
    skipped: bool = False
    """The optimizer step was skipped for a non-finite gradient (``on_nonfinite="skip"``)."""


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[torch.Tensor],
    grad_clip: float,
    per_layer: bool = False,
    autocast: str = "none",
    on_nonfinite: str = "raise",
    reduce_in_backward: bool = False,
) -> StepStats:
    """One optimizer step over ``micro_batches`` (gradient accumulation, equal-sized blocks, so
    the mean of the micro-batch means is the batch mean).

    ``per_layer``: the backward pass itself updates every parameter (the optimizer's hooks clip
    each parameter's update input), so there is no global clip and no ``optimizer.step()``.
    Under DDP the gradient all-reduce runs only on the last micro-batch. ``autocast="bf16"``
    runs the forward pass (and so the matching backward kernels) in bf16 over fp32 weights.

    Non-finite gradients follow ``on_nonfinite`` (see :func:`_clip_and_step`); the scheduler
    steps either way.

    The micro-batches are already on the model's device; the loss is summed there and read
    once, after the optimizer step (one host sync per step).

    ``reduce_in_backward``: wrap the last micro-batch's backward in the optimizer's
    ``reducing_in_backward()`` (its low-rank reductions then overlap backward)."""
    model.train()
    if not per_layer:
        optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    overlap = reduce_in_backward and isinstance(optimizer, GradNormLoRPAdamW) and not per_layer
    total = _accumulate_gradients(model, optimizer, micro_batches, autocast, overlap)
    grad_norm = None
    skipped = False
    if not per_layer:
        grad_norm, skipped = _clip_and_step(model, optimizer, grad_clip, on_nonfinite)
    with warnings.catch_warnings():
        # Per-layer mode steps inside backward, which torch's scheduler cannot see.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    return StepStats(
        loss=float(total) / len(micro_batches), lr=lr, grad_norm=grad_norm, skipped=skipped
    )


def _accumulate_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[torch.Tensor],
    autocast: str,
    overlap: bool,
) -> torch.Tensor:
    """Forward and backward over every micro-batch, each loss scaled by ``1 / len``; the sum of
    the micro-batch losses, on their device (not read here). ``overlap``: start the optimizer's
    own reductions inside the last backward pass."""
    total = torch.zeros((), dtype=torch.float32, device=micro_batches[0].device)
    # FSDP2's no_sync: gradients accumulate unsharded and are reduce-scattered once, at the last
    # micro-batch (more memory for the unsharded gradients, 1/k of the gradient traffic).
    fsdp_sync = getattr(model, "set_requires_gradient_sync", None)
    for index, ids in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        if fsdp_sync is not None and len(micro_batches) > 1:
            fsdp_sync(last)
        no_sync = getattr(model, "no_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with autocast_context(ids.device, autocast):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            # The optimizer's own reductions start inside the last backward pass (a no-op
            # unless it reduces the gradients itself, in low rank).
            in_backward = optimizer.reducing_in_backward() if overlap and last else None
            with in_backward or contextlib.nullcontext():
                (loss / len(micro_batches)).backward()
        total += loss.detach().float()
    return total


def _clip_and_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, on_nonfinite: str
) -> tuple[float | None, bool]:
    """Clip the whole gradient to ``grad_clip`` (when > 0) and take the optimizer step:
    ``(gradient norm before clipping or None, whether the step was skipped)``.

    Non-finite gradients: a :class:`GradNormLoRPAdamW` applies its own ``on_nonfinite`` policy
    (told by a finite clipping norm that the gradients are finite, so it does not check twice);
    any other optimizer (torch's AdamW, replicated: DDP-averaged gradients are the same on every
    rank) gets the same policy from ``on_nonfinite`` here: the clipping norm, or one fused count
    and one ``.item()``, decides, and a non-finite step is skipped (``optimizer.step()`` not
    called) or raises a ValueError."""
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = None
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if isinstance(optimizer, GradNormLoRPAdamW):
        if grad_norm is not None and math.isfinite(grad_norm):
            optimizer.mark_gradients_finite()  # the norm was the check
        optimizer.step()
        return grad_norm, optimizer.last_step_skipped
    finite = (
        math.isfinite(grad_norm)
        if grad_norm is not None
        else not params or non_finite_count([p.grad for p in params]).item() == 0
    )
    if finite:
        optimizer.step()
        return grad_norm, False
    if on_nonfinite == "skip":
        return grad_norm, True
    raise ValueError(
        "non-finite gradient: the optimizer step was not taken. Lower the learning "
        "rate, enable gradient clipping, or check the data (--on-nonfinite skip "
        "skips such steps)."
    )
