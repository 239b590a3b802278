"""User-facing errors of GradNormLoRPAdamW: the group checks and the messages, with the fix."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.spec import GroupSpec, check_finite_hyperparameters, check_min_8bit_size


def non_finite_refresh_error(names: list[str], step: int | str) -> ValueError:
    return ValueError(
        f"{', '.join(names)}: non-finite gradient at a subspace refresh (step {step}); the "
        "projector was not refreshed and no parameter was updated. Lower the learning rate, "
        "enable gradient clipping, or check the loss scale."
    )


NON_FINITE_POLICIES = ("raise", "skip")


def check_non_finite_policy(policy: object) -> str:
    if policy not in NON_FINITE_POLICIES:
        raise ValueError(
            f"on_nonfinite={policy!r}: use 'raise' (a non-finite gradient raises a ValueError) "
            "or 'skip' (the step is skipped: weights, moments and step counters untouched)"
        )
    return str(policy)


def non_finite_step_error(names: list[str], step: int | str) -> ValueError:
    return ValueError(
        f"{', '.join(names)}: non-finite gradient (step {step}); no parameter, moment, "
        "projector or step counter was changed. Lower the learning rate, enable gradient "
        "clipping, or check the data; on_nonfinite='skip' (gnlorp-train --on-nonfinite skip) "
        "skips such steps instead."
    )


def flat_gradient_error(name: str, grad: Tensor) -> ValueError:
    return ValueError(
        f"{name}: a projected parameter reached the optimizer with a {grad.dim()}-D gradient of "
        f"shape {tuple(grad.shape)}; the projector needs the true 2-D gradient. Flat gradients "
        "come from an engine that flattens parameters (DeepSpeed ZeRO, bf16 optimizer wrapper): "
        "use gnlorp_dist's DeepSpeed integration instead of passing this optimizer to the engine "
        "directly."
    )


def missing_communicator_error(world_size: str | None) -> ValueError:
    return ValueError(
        f"WORLD_SIZE={world_size} but no communicator was given and torch.distributed is not "
        "initialised: every rank would keep all optimizer states and recompute every SVD on its "
        "own. Initialise the process group first (deepspeed.initialize, accelerate, "
        "torch.distributed.init_process_group) and import gnlorp_dist, or pass "
        "communicator=gnlorp_dist.distributed.ProcessGroupCommunicator(), or "
        "LocalCommunicator() to replicate the optimizer on purpose."
    )


def layout_world_size_error(saved: dict[str, Any], rank: int, world_size: int) -> ValueError:
    return ValueError(
        f"this optimizer state was saved by rank {rank}'s shard of a {saved['engine']} job on "
        f"{saved['world_size']} ranks and cannot be loaded on {world_size}: low-rank states "
        "belong to the ranks that owned them. Resume on the same number of ranks, or load the "
        "module weights only (engine.load_checkpoint(..., load_optimizer_states=False)) and "
        "start the optimizer afresh."
    )


CONSOLIDATE_FIX = (
    "call optimizer.consolidate_state_dict() on every rank before a rank-0-only save; "
    "transformers.Trainer: use gnlorp_dist.integrations.transformers.GradNormLoRPTrainer or add "
    "its callback"
)


def ranks_missing_error(what: str, rank: int, world_size: int, timeout_s: float) -> ValueError:
    return ValueError(
        f"{what} was called on rank {rank} of {world_size}, but not every rank joined within "
        f"{timeout_s:g} s: the optimizer state is sharded over the ranks, so the whole state can "
        f"only be gathered when every rank calls it. Fix: {CONSOLIDATE_FIX}. (The wait is "
        "GNLORP_STATE_DICT_TIMEOUT_S seconds, default 60.)"
    )


def shard_state_dict_error(
    saved_rank: int, saved_world_size: int, rank: int, world_size: int
) -> ValueError:
    return ValueError(
        f"this optimizer state dict holds only rank {saved_rank}'s shard of a "
        f"{saved_world_size}-rank job and cannot be loaded into rank {rank} of {world_size}: the "
        "other ranks' states would silently restart from zero. Load each rank's own file on the "
        "same number of ranks, or save the whole state instead (optimizer.state_dict() called on "
        f"every rank, or {CONSOLIDATE_FIX})."
    )


def unmarked_state_dict_error(world_size: int, shapes: tuple[Any, Any] | None) -> ValueError:
    found = (
        f"a dense moment of shape {shapes[0]} for a parameter of shape {shapes[1]}"
        if shapes
        else f"loading it on {world_size} ranks"
    )
    return ValueError(
        "this optimizer state dict has no 'gnlorp' entry: an older gnlorp_dist saved it, and "
        f"then state_dict() held one rank's shard only ({found}); the other ranks' states would "
        "silently restart from zero. Resume from gnlorp_dist.distributed.save_sharded_optimizer "
        "files, or from a state dict saved by this version (whole state, any world size)."
    )


def warn_if_nothing_is_projected(specs: list[GroupSpec]) -> bool:
    """A UserWarning if no group carries ``rank`` (checked once, at the first step); True."""
    if not any(spec.projection is not None for spec in specs):
        warnings.warn(rankless_groups_warning(), UserWarning, stacklevel=_user_stacklevel())
    return True


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside torch and gnlorp_dist (for the function
    that calls this one): ``step()`` is wrapped by a varying number of torch and scheduler
    frames, so a fixed level would point into them."""
    packages = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    internal = tuple(package + os.sep for package in packages)
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def rankless_groups_warning() -> str:
    return (
        "GradNormLoRPAdamW: no parameter group carries 'rank', so nothing is projected and this "
        "is plain AdamW. transformers.Trainer(optimizer_cls_and_kwargs=(GradNormLoRPAdamW, "
        "{'lr': ...})) passes every parameter in one group without 'rank'. Build the groups with "
        "gnlorp_dist.projected_param_groups(model, rank=..., update_proj_gap=..., scale=...) "
        "(Trainer: optimizer_cls_and_kwargs=(GradNormLoRPAdamW, {'params': groups, 'lr': ...})) "
        "or use gnlorp_dist.integrations.transformers.GradNormLoRPTrainer."
    )


def gradients_differ_error(world_size: int) -> ValueError:
    return ValueError(
        f"the {world_size} ranks' gradients differ: they were not averaged across ranks, but "
        "the optimizer state is sharded (each matrix is updated by its owner from the owner's "
        "gradient and broadcast), so the other ranks' data would be silently ignored. Nothing "
        "was updated. Fix: wrap the model in DDP (torch.nn.parallel.DistributedDataParallel, or "
        "Accelerator.prepare); on CPU launch with ACCELERATE_USE_CPU=1 accelerate launch "
        "--multi_gpu or torchrun. Without DDP, pass reduce_gradients=True."
    )


def merged_away_error(name: str) -> ValueError:
    return ValueError(
        f"{name} was removed from the model by gnlorp_dist.merge_weight_norm: the model no "
        "longer computes with it, so this optimizer would step a tensor nobody uses. Build the "
        "optimizer again over the merged model's parameters (or merge after training)."
    )


GRADIENT_REDUCTIONS = ("none", "full", "low_rank")


def check_gradient_reduction(value: str | None, reduce_gradients: bool) -> str:
    """``gradient_reduction`` resolved with the older ``reduce_gradients=True`` (= ``"full"``)."""
    if value is None:
        return "full" if reduce_gradients else "none"
    if value not in GRADIENT_REDUCTIONS:
        raise ValueError(
            f"gradient_reduction={value!r}: use 'none' (gradients arrive averaged: DDP or an "
            "engine), 'full' (each full gradient block reduced to its owner) or 'low_rank' "
            "(projected matrices' low-rank gradients reduced: the fewest bytes)"
        )
    if reduce_gradients and value == "none":
        raise ValueError(
            "reduce_gradients=True with gradient_reduction='none' contradict each other; pass "
            "gradient_reduction='full' or 'low_rank' alone"
        )
    return value


def check_max_grad_norm(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ValueError(f"max_grad_norm={value!r} must be a number >= 0 (0 disables clipping)")
    if not math.isfinite(value):
        raise ValueError(f"max_grad_norm={value!r} must be finite")
    return float(value)


def check_defaults(
    *,
    lr: float | Tensor,
    betas: Sequence[float | Tensor],
    eps: float,
    weight_decay: float,
    bits: int,
    min_8bit_size: int,
) -> None:
    """The optimizer's defaults (its keyword arguments), with the value and the fix. ``lr`` and
    ``betas`` may be one-element Tensors, as ``torch.optim.AdamW``'s (both betas, or neither).
    ``bits`` is checked with each group (:func:`~gnlorp_dist.optim.spec.parse_group`)."""
    check_tensor_hyperparameters(lr, betas)
    lr, betas = _value(lr), tuple(_value(b) for b in betas)
    check_finite_hyperparameters("", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr >= 0.0):
        raise ValueError(f"lr={lr!r} must be a number >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"eps={eps!r} must be >= 0")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
    check_min_8bit_size(min_8bit_size, "")


def check_tensor_hyperparameters(lr: object, betas: Sequence[object]) -> None:
    """Tensor ``lr`` / ``betas`` as ``torch.optim.AdamW`` takes them (its messages, then ours)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(
            f"Tensor lr must be 1-element (got shape {tuple(lr.shape)}); pass torch.tensor(value)"
        )
    tensors = [isinstance(b, Tensor) for b in betas]
    if any(tensors) and not all(tensors):
        raise ValueError(
            f"betas must be either both floats or both Tensors (got {tuple(betas)!r}); pass "
            "(float, float) or (torch.tensor(beta1), torch.tensor(beta2))"
        )
    if any(isinstance(b, Tensor) and b.numel() != 1 for b in betas):
        raise ValueError(f"Tensor betas must be 1-element (got {tuple(betas)!r})")


def _value(value: object) -> object:
    """A one-element Tensor's value (what the step reads); anything else as it is."""
    return value.item() if isinstance(value, Tensor) else value
