"""One optimizer step over a param group an engine flattened (DeepSpeed ZeRO 1/2/3).

Each rank holds a :class:`~gnlorp_dist.optim.fragments.Fragment` (a flat run) of some matrices.
The math is the one-process math of :class:`GradNormLoRPAdamW`; only where tensors live changes:

- a projected matrix is *owned* whole by one rank (the ownership plan of
  :mod:`gnlorp_dist.optim.ownership`), which alone holds its Adam moments and runs its SVD;
- its basis ``proj`` is kept by every rank holding a run of it (they need it to project and to
  project back); a dense parameter's moments live with its runs (AdamW is element-wise).

Phases of a step, for the group the engine is stepping:

1. refresh: for every matrix whose refresh is due, every rank sends its run, zero-padded, in a
   sum-reduce to the owner (the only time a whole gradient is assembled); a scalar all-reduce of
   the non-finite count makes all ranks raise together; the owner computes the SVD (once in the
   whole job) and broadcasts the basis;
2. project: every rank projects its runs and the partial low-rank sums are reduced to the owner
   (``M x r`` or ``r x N`` per matrix, not ``M x N``);
3. update: the owner runs Adam on the low-rank gradient and broadcasts the normalised low-rank
   direction; meanwhile every rank updates its dense runs;
4. apply: every rank projects the direction back onto its runs and updates its master weights.
   The engine then casts and gathers the weights as it does for any optimizer.

Devices: the buffers of phases 1-3 (zero-padded full gradients, partial low-rank sums, bases,
directions) travel in collectives, so they live on the communicator's device
(:func:`work_device`); on one process, where nothing travels, on the fragments' device. Bases and
low-rank moments stay there between steps; dense moments live with their runs. Host sync: one
``.item()`` (the non-finite verdict) per projected group at a refresh step: every rank counts
every matrix's steps, so all ranks agree on when a refresh is due.

Non-finite gradients: before phase 1, :func:`flattened_gradients_finite` checks every run this
rank holds in the groups of this ``step()`` call (one fused count, one scalar all-reduce, one
``.item()`` per call), so every rank skips (``on_nonfinite="skip"``) or raises together before
any master weight, moment, basis or step counter changes. DeepSpeed calls ``step()`` once per
param group, so a skip covers the group(s) of that call; groups stepped earlier in the same
engine step stay stepped (a NaN loss makes every group's gradient non-finite, so all skip).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import buffer_device, non_finite_on_any_rank, wait_all
from gnlorp_dist.optim.dense import update_dense_block
from gnlorp_dist.optim.fragment_state import STATE_PREFIX, adopt_pending_state
from gnlorp_dist.optim.fragments import (
    EngineLayout,
    Fragment,
    ModelParameter,
    back_project_fragment,
    detect_engine_layout,
    project_fragment,
)
from gnlorp_dist.optim.functional import (
    apply_projected_update_,
    normalized_low_rank_update,
    update_moments_,
)
from gnlorp_dist.optim.ownership import plan_ownership
from gnlorp_dist.optim.quantized import MomentStore
from gnlorp_dist.optim.validation import non_finite_refresh_error, non_finite_step_error
from gnlorp_dist.projection import (
    low_rank_shape,
    projection_shape,
    projection_side,
)

if TYPE_CHECKING:
    from gnlorp_dist.optim.adamw import GradNormLoRPAdamW

LAYOUT_KEY = STATE_PREFIX + "__layout__"
"""Flattened parameters' state is keyed ``zero/<name>`` (names, not tensors: the engine owns the
tensors; ``torch.Optimizer.state_dict`` keeps string keys as they are)."""


def fragment_state(optimizer: GradNormLoRPAdamW, name: str) -> dict[str, Any]:
    return optimizer.state[STATE_PREFIX + name]


def find_flattened_groups(
    optimizer: GradNormLoRPAdamW,
) -> list[tuple[int, EngineLayout, list[Tensor]]]:
    """``(group index, layout, engine tensors)`` of each group an engine flattened right now.

    Engines step one group at a time and may swap ``param_groups`` for a one-group list or empty
    the other groups' ``params``; groups are recognised by identity with the dicts this optimizer
    built at construction, which engines keep.
    """
    found = []
    for group in optimizer.param_groups:
        engine_params = list(group["params"])
        if not engine_params:
            continue
        matches = [i for i, g in enumerate(optimizer.groups_at_construction) if g is group]
        if not matches:
            raise ValueError(
                "a param group reached GradNormLoRPAdamW.step() that this optimizer did not "
                "build (an engine replaced the group dicts); add every group before "
                "deepspeed.initialize and load state with optimizer.load_state_dict"
            )
        index = matches[0]
        layout = detect_engine_layout(optimizer.model_params[index], engine_params)
        if layout is not None:
            found.append((index, layout, engine_params))
    return found


def model_parameters(
    optimizer: GradNormLoRPAdamW, group_index: int, layout: EngineLayout
) -> list[ModelParameter]:
    group = optimizer.groups_at_construction[group_index]
    names = group.get("param_names")
    return [
        ModelParameter(
            tensor=param,
            shape=layout.true_shape(param),
            name=names[i] if names else f"param_groups[{group_index}][{i}]",
        )
        for i, param in enumerate(optimizer.model_params[group_index])
    ]


def flattened_owners(optimizer: GradNormLoRPAdamW, layout: EngineLayout) -> dict[str, int]:
    """Owner rank of every projected matrix, by name: the same plan as unflattened runs."""
    if optimizer.flattened_plan is None:
        names, shapes, ranks, proj_types = [], [], [], []
        for index, group in enumerate(optimizer.groups_at_construction):
            if "rank" not in group:
                continue
            for param in model_parameters(optimizer, index, layout):
                names.append(param.name)
                shapes.append(param.shape)
                ranks.append(group["rank"])
                proj_types.append(group["proj_type"])
        plan = plan_ownership(shapes, ranks, proj_types, optimizer.comm.world_size)
        optimizer.flattened_plan = {names[b.param_index]: b.owner for b in plan}
    return optimizer.flattened_plan


def work_device(
    optimizer: GradNormLoRPAdamW, params: list[ModelParameter], fragments: list[Fragment | None]
) -> torch.device:
    """Where this group's low-rank work happens: the communicator's device (its buffers travel),
    or, on one process, the device of the fragments' gradients."""
    held = [f.grad.device for f in fragments if f is not None]
    return buffer_device(optimizer.comm, held[0] if held else params[0].tensor.device)


def flattened_gradients_finite(
    optimizer: GradNormLoRPAdamW, flattened: list[tuple[int, EngineLayout, list[Tensor]]]
) -> bool:
    """Whether every rank's runs in ``flattened`` have finite gradients; a ValueError naming them
    on every rank instead when ``optimizer.on_nonfinite == "raise"`` (see the module docstring)."""
    comm = optimizer.comm
    named: list[tuple[str, Tensor]] = []
    device = None
    for group_index, layout, engine_params in flattened:
        params = model_parameters(optimizer, group_index, layout)
        fragments = layout.fragments(params, engine_params, comm.rank, comm.world_size)
        device = device or work_device(optimizer, params, fragments)
        named += [(p.name, f.grad[: f.numel]) for p, f in zip(params, fragments) if f is not None]
    assert device is not None
    if not non_finite_on_any_rank(comm, [grad for _name, grad in named], device):
        return True
    if optimizer.on_nonfinite == "skip":
        return False
    # The error path only: name the offenders (one host read each).
    bad = [name for name, grad in named if not bool(torch.isfinite(grad).all())]
    steps = sorted(
        int(fragment_state(optimizer, name).get("step", 0))
        for name in bad
        if STATE_PREFIX + name in optimizer.state
    )
    raise non_finite_step_error(
        bad or ["a matrix held by another rank"], steps[0] if steps else "?"
    )


def step_flattened_group(
    optimizer: GradNormLoRPAdamW,
    group_index: int,
    layout: EngineLayout,
    engine_params: list[Tensor],
) -> None:
    """Phases 1-4 for param group ``group_index`` (see the module docstring)."""
    group = optimizer.groups_at_construction[group_index]
    comm = optimizer.comm
    params = model_parameters(optimizer, group_index, layout)
    fragments = layout.fragments(params, engine_params, comm.rank, comm.world_size)
    optimizer.state[LAYOUT_KEY] = {"engine": layout.name, "world_size": comm.world_size}
    if "rank" in group:
        plan = flattened_owners(optimizer, layout)
        owners = [plan[p.name] for p in params]
        device = work_device(optimizer, params, fragments)
        adopt_pending_state(optimizer, group, params, fragments, owners, device)
        _refresh_due(optimizer, group, params, fragments, owners, device)
        directions = _low_rank_directions(optimizer, group, params, fragments, owners, device)
        _apply_directions(optimizer, group, params, fragments, directions)
    else:
        adopt_pending_state(optimizer, group, params, fragments, None, None)
        for param, fragment in zip(params, fragments):
            if fragment is not None:
                _update_dense_fragment(optimizer, group, param, fragment)


def _is_due(group: dict[str, Any], state: dict[str, Any]) -> bool:
    return state.get("step", 0) % group["update_proj_gap"] == 0


def _refresh_due(
    optimizer: GradNormLoRPAdamW,
    group: dict[str, Any],
    params: list[ModelParameter],
    fragments: list[Fragment | None],
    owners: list[int],
    device: torch.device,
) -> None:
    comm = optimizer.comm
    due = [i for i, p in enumerate(params) if _is_due(group, fragment_state(optimizer, p.name))]
    if not due:
        return  # every rank agrees: steps are counted for every matrix on every rank
    full_grads: dict[int, Tensor] = {}
    handles = []
    for i in due:
        numel = params[i].shape[0] * params[i].shape[1]
        fragment = fragments[i]
        full = torch.zeros(numel, dtype=torch.float32, device=device)
        if fragment is not None:
            full[fragment.start : fragment.start + fragment.numel] = fragment.grad[: fragment.numel]
        handles.append(comm.reduce_sum(full, dst=owners[i]))
        if owners[i] == comm.rank:
            full_grads[i] = full
    wait_all(handles)
    if non_finite_on_any_rank(comm, list(full_grads.values()), device):
        # The error path only: name the offenders (one host read each).
        bad = [params[i].name for i, g in full_grads.items() if not bool(torch.isfinite(g).all())]
        step = min(int(fragment_state(optimizer, params[i].name).get("step", 0)) for i in due)
        raise non_finite_refresh_error(bad or ["a matrix owned by another rank"], step)
    bases: dict[int, Tensor] = {}
    handles = []
    for i in due:
        shape = params[i].shape
        side = projection_side(shape, group["proj_type"])
        state = fragment_state(optimizer, params[i].name)
        if owners[i] == comm.rank:
            basis = optimizer.compute_basis(group, full_grads.pop(i).view(shape), state)
        else:
            basis_shape = projection_shape(shape, group["rank"], side)
            basis = torch.empty(basis_shape, dtype=torch.float32, device=device)
        handles.append(comm.broadcast(basis, src=owners[i]))
        bases[i] = basis
    wait_all(handles)
    for i, basis in bases.items():
        state = fragment_state(optimizer, params[i].name)
        if fragments[i] is not None:
            state["proj"] = basis
        else:
            state.pop("proj", None)


def _low_rank_directions(
    optimizer: GradNormLoRPAdamW,
    group: dict[str, Any],
    params: list[ModelParameter],
    fragments: list[Fragment | None],
    owners: list[int],
    device: torch.device,
) -> list[Tensor]:
    """Phases 2 and 3: each matrix's normalised low-rank Adam direction, on every rank."""
    comm = optimizer.comm
    sums, handles = [], []
    for param, fragment, owner in zip(params, fragments, owners):
        shape = param.shape
        side = projection_side(shape, group["proj_type"])
        state = fragment_state(optimizer, param.name)
        low = torch.zeros(low_rank_shape(shape, group["rank"], side), device=device)
        if fragment is not None:
            grad = fragment.grad[: fragment.numel].to(device)
            project_fragment(grad, fragment.start, fragment.numel, shape, state["proj"], side, low)
        handles.append(comm.reduce_sum(low, dst=owner))
        sums.append(low)
    wait_all(handles)
    beta1, beta2 = group["betas"]
    handles = []
    for param, low, owner in zip(params, sums, owners):
        state = fragment_state(optimizer, param.name)
        state["step"] = state.get("step", 0) + 1
        if owner == comm.rank:
            moments = MomentStore(state, group["bits"])
            if "exp_avg" not in state:
                moments.initialise(low)
            exp_avg, exp_avg_sq = moments.load()
            update_moments_(exp_avg, exp_avg_sq, low, beta1, beta2)
            moments.store(exp_avg, exp_avg_sq)
            low.copy_(normalized_low_rank_update(exp_avg, exp_avg_sq, group["eps"]))
        handles.append(comm.broadcast(low, src=owner))
    wait_all(handles)
    return sums


def _apply_directions(
    optimizer: GradNormLoRPAdamW,
    group: dict[str, Any],
    params: list[ModelParameter],
    fragments: list[Fragment | None],
    directions: list[Tensor],
) -> None:
    beta1, beta2 = group["betas"]
    for param, fragment, direction in zip(params, fragments, directions):
        if fragment is None:
            continue
        state = fragment_state(optimizer, param.name)
        side = projection_side(param.shape, group["proj_type"])
        proj = state["proj"]
        update = back_project_fragment(
            direction, fragment.start, fragment.numel, param.shape, proj, side
        )
        apply_projected_update_(
            fragment.master[: fragment.numel],
            update.to(fragment.master.device, fragment.master.dtype),
            step=state["step"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            scale=group["scale"],
        )
        if fragment.write_back is not None:
            fragment.write_back()


def _update_dense_fragment(
    optimizer: GradNormLoRPAdamW, group: dict[str, Any], param: ModelParameter, fragment: Fragment
) -> None:
    state = fragment_state(optimizer, param.name)
    if "exp_avg" not in state:
        state["run"] = [fragment.start, fragment.numel]  # where these moments sit in the matrix
    update_dense_block(
        state,
        group,
        fragment.master[: fragment.numel],
        fragment.grad[: fragment.numel],
        param_numel=math.prod(param.shape),
    )
    if fragment.write_back is not None:
        fragment.write_back()
