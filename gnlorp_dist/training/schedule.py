"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GaLore's recipe)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the optimizer step with index ``step`` (0-based).

    Warmup ends at full lr on step ``warmup_steps - 1`` (the first step is not wasted at lr 0);
    the cosine then reaches ``min_ratio`` at ``total_steps`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> LambdaLR:
    """A LambdaLR over :func:`warmup_cosine_factor`; its state_dict resumes the schedule.

    The factor is a plain function (a closure), so LambdaLR stores none of its arguments in the
    state dict: a resumed run may change ``total_steps`` and gets the new schedule.
    """
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_ratio}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
        )

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio)

    return LambdaLR(optimizer, factor)


def sync_lr_to_schedule(scheduler: LambdaLR) -> None:
    """Set each group's lr to what the schedule gives at its current step.

    After ``scheduler.load_state_dict`` the groups keep the lr saved with the optimizer (or, for
    a new optimizer, the peak lr); a resumed run whose ``total_steps`` changed, or whose optimizer
    state was rebuilt, would take its first step at that lr instead of the schedule's.
    """
    lrs = [
        base * factor(scheduler.last_epoch)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports; LambdaLR has no public setter


def rebase_peak_lr(scheduler: LambdaLR, lr: float) -> None:
    """Make ``lr`` every group's peak lr, keeping the schedule's position: after a resume loaded
    the checkpoint's peak (the optimizer's groups and the scheduler's ``base_lrs``) and the run
    overrides it (``--override lr=...``), the next step takes ``lr`` times the schedule's factor
    at that step."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = lr
    sync_lr_to_schedule(scheduler)
