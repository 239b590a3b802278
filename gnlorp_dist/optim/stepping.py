"""What one ``step()`` steps on this rank: a :class:`GroupStep` per param group.

Each group's layout is detected from what the engine put in the group now (the model's own
tensors, or an engine's runs), its placements chosen from that layout, and its states looked up
where this rank keeps them; the driver (:mod:`gnlorp_dist.optim.driver`) then runs its phases.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from torch import Tensor

from gnlorp_dist.optim.comm import Communicator, buffer_device
from gnlorp_dist.optim.data_parallel import check_replicated_gradients
from gnlorp_dist.optim.fragment_state import LAYOUT_KEY, STATE_PREFIX, adopt_loaded_state
from gnlorp_dist.optim.fragments import Fragment, ModelParameter
from gnlorp_dist.optim.group_step import GroupStep
from gnlorp_dist.optim.layouts import LOW_RANK_REDUCED, REPLICATED, Layout, detect_layout
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.param_table import ParamTable
from gnlorp_dist.optim.placements import place
from gnlorp_dist.optim.spec import GroupSpec, group_params, hyperparameters

TakeLowRank = Callable[[Tensor], Tensor | None]
"""A low-rank gradient whose reduce already ran inside backward, by parameter (or None)."""


def state_key(layout: Layout, param: ModelParameter) -> Any:
    """THE state keying: a parameter's own tensor, or its name where an engine replaced the
    group's tensors (torch's ``state_dict()`` can only index the tensors it steps)."""
    return STATE_PREFIX + param.name if layout.flattened else param.tensor


def group_layout(
    table: ParamTable, index: int, engine_params: list[Tensor], low_rank_reduction: bool
) -> Layout:
    """The layout of group ``index`` as the engine holds it now; a replicated group under the
    low-rank reduction (several ranks, each with its own gradients) is not averaged."""
    layout = detect_layout(table.model_params[index], engine_params)
    if layout is REPLICATED and low_rank_reduction:
        return LOW_RANK_REDUCED
    return layout


def group_steps(
    table: ParamTable,
    param_groups: list[dict[str, Any]],
    state: MutableMapping[Any, Any],
    comm: Communicator,
    *,
    low_rank_reduction: bool,
    take_low_rank: TakeLowRank | None = None,
    loaded_engine_state: dict[str, dict[str, Any]] | None = None,
) -> list[GroupStep]:
    """One :class:`GroupStep` per param group an engine is stepping now (all of them, outside
    engines), each with its layout, this rank's runs and states. ``low_rank_reduction``: the
    optimizer reduces low-rank gradients over several ranks; ``take_low_rank``: the
    reductions started inside backward; ``loaded_engine_state``: an engine checkpoint's state,
    adopted by this rank's runs."""
    steps = []
    for group in param_groups:
        engine_params = list(group_params(group))
        if not engine_params:
            continue  # engines that step one group at a time empty the others
        index = table.index_of(group)
        layout = group_layout(table, index, engine_params, low_rank_reduction)
        params = table.model_parameters(index, None if layout.flattened else engine_params)
        spec = table.specs[index]
        if layout.replicated:
            check_replicated_gradients(spec.projection is not None, params)
        fragments = layout.fragments(params, engine_params, comm.rank, comm.world_size)
        active = [layout.has_gradient(p.tensor) for p in params]
        plan = table.plan(comm.world_size)
        blocks = [plan[table.position(index, i)] for i in range(len(params))]
        if layout.flattened:
            state[LAYOUT_KEY] = {"engine": layout.name, "world_size": comm.world_size}
        held = [f.grad.device for f in fragments if f is not None]
        like = held[0] if held else params[0].tensor.device
        group_step = GroupStep(
            group=table.groups[index],
            spec=spec,
            hyper=hyperparameters(table.groups[index]),
            layout=layout,
            params=params,
            fragments=fragments,
            states=_states(state, spec, layout, params, fragments, active, blocks, comm.rank),
            active=active,
            placements=place(layout, spec.projection, params),
            blocks=blocks,
            comm=comm,
            device=buffer_device(comm, like),
        )
        if loaded_engine_state:
            adopt_loaded_state(group_step, loaded_engine_state)
        if take_low_rank is not None and layout is LOW_RANK_REDUCED:
            for i, param in enumerate(params):
                low = take_low_rank(param.tensor)
                if low is not None:
                    group_step.reduced[i] = low
        steps.append(group_step)
    return steps


def _states(
    state: MutableMapping[Any, Any],
    spec: GroupSpec,
    layout: Layout,
    params: list[ModelParameter],
    fragments: list[Fragment | None],
    active: list[bool],
    blocks: list[list[OwnedBlock]],
    rank: int,
) -> list[dict[str, Any] | None]:
    """The state of each parameter this rank keeps one for (None elsewhere)."""
    projected = spec.projection is not None
    states: list[dict[str, Any] | None] = []
    for i, (param, param_blocks) in enumerate(zip(params, blocks)):
        if layout.replicated and (layout.averaged or not projected):
            keeps = any(b.owner == rank for b in param_blocks)  # owner's only
        else:  # a projected matrix's step counter (and basis) lives on every rank
            keeps = projected or fragments[i] is not None
        keeps = keeps and active[i]
        states.append(state[state_key(layout, param)] if keeps else None)
    return states
