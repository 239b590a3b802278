"""User-facing errors of GradNormLoRPAdamW: the group checks and the messages, with the fix."""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.projection import SVD_METHODS, projection_shape
from gnlorp_dist.optim.projector import (
    OPTIMIZER_PROJ_TYPES,
    SECOND_MOMENTS,
    granularity,
    group_side,
    is_random,
    projected_shape,
)
from gnlorp_dist.optim.quantized_basis import PROJ_BITS
from gnlorp_dist.optim.vlorp import BASIS_KINDS, check_granularity

PROJECTED_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def non_finite_error(names: list[str], state: Any, due: list[Any]) -> ValueError:
    steps = sorted({int(state[param].get("step", 0)) for _g, param, _n in due}) or ["?"]
    return non_finite_refresh_error(names, steps[0])


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


def check_finite_hyperparameters(where: str, **values: object) -> None:
    """NaN or infinite lr / eps / weight_decay / betas would poison every weight at once."""
    for name, value in values.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, (int, float)) and not math.isfinite(item):
                raise ValueError(f"{where}{name}={value!r} must be finite")


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


def validate_projected_group(group: dict[str, Any], group_index: int) -> None:
    """User mistakes in a projected group, raised at construction with the value and the fix."""
    where = f"param_groups[{group_index}]"
    missing = [key for key in PROJECTED_GROUP_KEYS if key not in group]
    if missing:
        raise ValueError(
            f"{where} has 'rank' but lacks {missing}; a projected group needs "
            f"{list(PROJECTED_GROUP_KEYS)} (see gnlorp_dist.projected_param_groups)"
        )
    rank, gap, scale = group["rank"], group["update_proj_gap"], group["scale"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{where}: rank={rank!r} must be a positive integer")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(
            f"{where}: update_proj_gap={gap!r} must be a positive integer (steps between "
            "subspace refreshes; GaLore uses 200)"
        )
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{where}: scale={scale!r} must be a finite number")
    if group["proj_type"] not in OPTIMIZER_PROJ_TYPES:
        raise ValueError(
            f"{where}: proj_type={group['proj_type']!r} is not supported; use one of "
            f"{OPTIMIZER_PROJ_TYPES}"
        )
    validate_vlorp_options(group, where)
    if group.get("svd_method", "auto") not in SVD_METHODS:
        raise ValueError(
            f"{where}: svd_method={group['svd_method']!r} is not supported; use one of {SVD_METHODS}"
        )
    proj_bits = group.get("proj_bits")
    if proj_bits not in PROJ_BITS or isinstance(proj_bits, bool):
        raise ValueError(
            f"{where}: proj_bits={proj_bits!r} is not supported; use None (bases in the "
            "gradient's dtype), 8 (INT8) or 4 (INT4, two per byte)"
        )
    threshold = group.get("lazy_refresh_threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{where}: lazy_refresh_threshold={threshold!r} must be a number")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"{where}: lazy_refresh_threshold={threshold!r} must be in [0, 1] (the subspace "
            "overlap above which the refresh gap doubles; 0 turns lazy refresh off)"
        )
    most = group.get("max_update_proj_gap", gap)
    if isinstance(most, bool) or not isinstance(most, int) or most < gap:
        raise ValueError(
            f"{where}: max_update_proj_gap={most!r} must be an integer >= update_proj_gap={gap}"
        )
    names = group.get("param_names")
    for index, param in enumerate(group["params"]):
        name = names[index] if names else f"{where}['params'][{index}]"
        # A ZeRO-3 partitioned parameter (built under deepspeed.zero.Init) is empty here; its
        # true shape is ds_shape, and the DeepSpeed layout finds its runs at the first step.
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if len(shape) != 2:
            raise ValueError(
                f"{name}: shape {shape} cannot be projected; a projected group takes 2-D matrices "
                "only. Put 1-D tensors (biases, norms, magnitudes) in a group without 'rank'."
            )
        c = granularity(group)
        if c > 1:
            try:
                check_granularity(shape, c)
            except ValueError as error:
                raise ValueError(
                    f"{name}: {error}; pick a granularity dividing every projected matrix's "
                    "columns, or leave this matrix out of the projected group"
                ) from None
        projected = projected_shape(shape, group)
        if rank > min(projected):
            reshaped = f" (reshaped to {projected} by granularity={c})" if c > 1 else ""
            raise ValueError(
                f"{name}: rank={rank} exceeds min(shape)={min(projected)} of shape "
                f"{shape}{reshaped}; use rank <= {min(projected)} or leave this matrix out of "
                "the projected group"
            )
        side = group_side(shape, group)
        if c > 1 and side != "right":
            raise ValueError(
                f"{name}: granularity={c} reshapes the {shape} gradient to {projected} and "
                f"projects it on the right, but proj_type={group['proj_type']!r} resolves to the "
                "left side for that shape; use proj_type='right' (SVD basis) or "
                "proj_type='random', or granularity=1"
            )
        if side != "right" and group.get("second_moment", "adam") == "factored":
            raise ValueError(
                f"{name}: second_moment='factored' (ProjFactor) needs a right-side projection, "
                f"but proj_type={group['proj_type']!r} projects the {shape} matrix on the left; "
                "use proj_type='right' or proj_type='random'"
            )
        basis_cols = projection_shape(projected, rank, side)[1]
        if proj_bits == 4 and basis_cols % 2:
            raise ValueError(
                f"{name}: proj_bits=4 packs two values per byte along the basis's last "
                f"dimension, which is {basis_cols} (odd) for shape {shape} projected on the "
                f"{side} at rank={rank}; use an even rank, or proj_bits=8"
            )


def validate_vlorp_options(group: dict[str, Any], where: str) -> None:
    """VLoRP's and ProjFactor's group options (granularity, random bases, second moment)."""
    c = group.get("granularity", 1)
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(
            f"{where}: granularity={c!r} must be a positive integer (1: project rows as "
            "GaLore does; c > 1 reshapes each M x N gradient to (M c, N / c))"
        )
    seed = group.get("projection_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{where}: projection_seed={seed!r} must be an integer >= 0")
    kind = group.get("random_basis", "gaussian")
    if kind not in BASIS_KINDS:
        raise ValueError(
            f"{where}: random_basis={kind!r} is not supported; use one of {BASIS_KINDS}"
        )
    moment = group.get("second_moment", "adam")
    if moment not in SECOND_MOMENTS:
        raise ValueError(
            f"{where}: second_moment={moment!r} is not supported; use 'adam' (a low-rank v) or "
            "'factored' (ProjFactor: row and column sums of the full-shape squared gradient)"
        )
    if not is_random(group):
        return
    if group.get("proj_bits") is not None:
        raise ValueError(
            f"{where}: proj_bits={group['proj_bits']!r} quantises stored bases, but "
            "proj_type='random' stores none (each basis is regenerated from its seed); drop "
            "proj_bits, or use an SVD proj_type"
        )
    if float(group.get("lazy_refresh_threshold", 0.0)) > 0.0:
        raise ValueError(
            f"{where}: lazy_refresh_threshold={group['lazy_refresh_threshold']!r} lengthens the "
            "gap after a refresh whose subspace did not move, but random bases of different "
            "windows are independent draws (their overlap measures nothing); drop "
            "lazy_refresh_threshold with proj_type='random', or use an SVD proj_type"
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


def warn_if_nothing_is_projected(groups: list[dict[str, Any]]) -> bool:
    """A UserWarning if no group carries ``rank`` (checked once, at the first step); True."""
    if not any("rank" in group for group in groups):
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


def check_min_8bit_size(value: int, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{where}min_8bit_size={value!r} must be an int >= 1 (tensors with fewer elements "
            "keep float32 moments; bitsandbytes' default is 4096)"
        )
