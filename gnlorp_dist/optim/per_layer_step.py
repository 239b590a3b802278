"""Per-layer mode of :class:`GradNormLoRPAdamW`: one parameter updated inside the backward pass.

Plain functions of a :class:`ParameterView` (what the optimizer knows of one parameter at one
hook), kept apart so the whole-step path and the per-parameter path read separately.
:class:`PerLayerUpdates` calls :meth:`GradNormLoRPAdamW.step_parameter` (which calls
:func:`step_parameter`) from each parameter's post-accumulate-grad hook and
:meth:`GradNormLoRPAdamW.finish_per_layer_step` (:func:`finish_step`) once the backward pass
that ends a step is over.

One micro-batch's ``param.grad`` is consumed and freed when possible. A projected parameter's
gradient is projected at once and summed in a low-rank buffer (projection is linear, so the sum
is exact); at a refresh step the subspace comes from the FIRST micro-batch's gradient, so no
full-size gradient outlives its hook. A dense parameter lets autograd accumulate ``param.grad``
until the last micro-batch. At the last micro-batch the parameter is updated with exactly the
math of ``step()``.

``max_grad_norm > 0`` clips, per parameter, the tensor Adam consumes (the summed low-rank
gradient of a projected parameter, the full gradient of a dense one) to that norm: with updates
inside the backward pass there is no global gradient norm.

Over several ranks (the model NOT wrapped in DDP), each gradient is reduced to the rank that
owns its state, the owner updates, and the updated blocks are broadcast before the hook
returns, so every rank leaves the backward pass with the same weights. Under the low-rank
reduction every rank projects its own gradient with the shared basis and only the summed
low-rank gradient travels (:func:`consume_projected_low_rank`).

Non-finite gradients always raise, whatever ``on_nonfinite`` says, and only once the step is
over: each hook adds the count of what it consumes (a projected parameter's gradient at every
micro-batch, a dense parameter's accumulated rows at the last one) to its parameter's slot of a
device tally (:class:`NonFiniteTally`; no host sync), and :func:`finish_step` reads the
step's verdict once (one scalar all-reduce, one ``.item()``) and raises the ValueError, naming
the parameters, on every rank. Inside the backward pass nothing waits for the device. By then
every parameter of the step was updated, so the non-finite entries of what the update consumes
(a projected parameter's low-rank gradient, the gradient a refresh takes its subspace from, a
dense parameter's gradient) are taken as zero on the device: weights, moments and bases stay
finite, and no rank fails alone in an SVD while the others wait.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import Communicator, buffer_device, non_finite_count, wait_all
from gnlorp_dist.optim.data_parallel import reduce_to_owners
from gnlorp_dist.optim.driver import (
    BasisSource,
    GroupStep,
    adam_directions,
    apply_directions,
    broadcast_updated,
    check_bases,
    low_rank_gradients,
    refresh_subspaces,
    settle_shared_blocks,
    update_dense,
)
from gnlorp_dist.optim.fragments import Fragment, ModelParameter
from gnlorp_dist.optim.functional import clip_by_norm_
from gnlorp_dist.optim.layouts import LOW_RANK_REDUCED, REPLICATED, Layout
from gnlorp_dist.optim.nonfinite_guard import consumed_gradients, zero_non_finite_
from gnlorp_dist.optim.owner_exchange import OwnerExchange
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.param_table import ParamTable
from gnlorp_dist.optim.placements import place
from gnlorp_dist.optim.projection import project
from gnlorp_dist.optim.projector import check_random_basis_device
from gnlorp_dist.optim.refresh import refresh_due
from gnlorp_dist.optim.spec import GroupSpec, ProjectionSpec, group_params, hyperparameters
from gnlorp_dist.optim.validation import flat_gradient_error


@dataclass
class NonFiniteTally:
    """The non-finite verdict of one per-layer step, kept on the device until the step ends.

    ``counts[i]``: how many tensors parameter ``i`` (its position over all groups) consumed
    non-finite on this rank at this step. Host-side notes (no sync) say, for the error message
    only, which parameters were consumed and at which step counter.
    """

    counts: Tensor
    finished: set[int] = field(default_factory=set)
    """Parameters whose last micro-batch of this step was consumed."""
    steps: dict[int, int] = field(default_factory=dict)
    """Each consumed parameter's step counter before this step's update (where kept here)."""
    refreshing: set[int] = field(default_factory=set)
    """Projected parameters whose subspace this step refreshed (or would have)."""
    pending: bool = False
    """Something was counted since the last verdict."""

    def add(self, index: int, tensors: list[Tensor]) -> None:
        self.pending = True
        tensors = [t for t in tensors if t.numel()]
        if tensors:  # nothing to count: no tensor is built (a CPU zero would be copied over)
            self.counts[index : index + 1].add_(non_finite_count(tensors).to(self.counts.device))

    def reset(self) -> None:
        self.counts.zero_()
        self.finished.clear()
        self.steps.clear()
        self.refreshing.clear()
        self.pending = False


def per_layer_non_finite_error(names: list[str], step: int | str, refresh: bool) -> ValueError:
    at = f"step {step}, a subspace refresh" if refresh else f"step {step}"
    return ValueError(
        f"{', '.join(names)}: non-finite gradient in per-layer mode ({at}). The backward pass "
        "had already updated every parameter of this step (per-layer updates happen inside it, "
        "the verdict is read once the step's last backward pass ends); the non-finite entries "
        "of what the named parameters consumed were taken as zero, so weights, moments and "
        "bases stay finite, but this step is not the one the gradients asked for. Resume from "
        "the last checkpoint; lower the learning rate, enable clipping or check the data "
        "(per-layer mode has no on_nonfinite='skip')."
    )


@dataclass(frozen=True, kw_only=True)
class ParameterView:
    """One parameter as a per-layer hook steps it: what the optimizer knows of it now."""

    param: Tensor
    """The parameter whose gradient is final for this micro-batch."""
    name: str
    """Its name (``param_names`` or its position)."""
    position: int
    """Its position over all the optimizer's groups (its slot in the tally)."""
    group: dict[str, Any]
    """Its group dict (read for the per-step hyperparameters and the random bases' record)."""
    spec: GroupSpec
    """Its group's spec."""
    blocks: list[OwnedBlock]
    """Its ownership blocks."""
    states: MutableMapping[Any, dict[str, Any]]
    """The optimizer's state (its entries are created on first use)."""
    comm: Communicator
    """The ranks of the job."""
    low_rank_reduction: bool
    """The optimizer reduces low-rank gradients (``gradient_reduction="low_rank"``)."""
    source: BasisSource
    """What computes a new basis (the optimizer: it counts the refreshes)."""
    tally: NonFiniteTally
    """The step's non-finite tally."""

    @property
    def projection(self) -> ProjectionSpec | None:
        return self.spec.projection

    def owns(self) -> bool:
        """Whether this rank holds (part of) the parameter's optimizer state."""
        return any(b.owner == self.comm.rank for b in self.blocks)


def new_tally(table: ParamTable, comm: Communicator, like: torch.device) -> NonFiniteTally:
    """A tally of every parameter of ``table`` on the communicator's device (or ``like``'s:
    one process)."""
    total = sum(len(params) for params in table.model_params)
    counts = torch.zeros(total, dtype=torch.float64, device=buffer_device(comm, like))
    return NonFiniteTally(counts=counts)


def view_of(
    param: Tensor,
    table: ParamTable,
    states: MutableMapping[Any, dict[str, Any]],
    comm: Communicator,
    *,
    low_rank_reduction: bool,
    source: BasisSource,
    tally: NonFiniteTally,
) -> ParameterView:
    """What the optimizer (its ``table``, ``states`` and ranks) knows of ``param`` now."""
    group_index, name = table.find(param)
    blocks = table.ownership(comm.world_size)[param]
    return ParameterView(
        param=param,
        name=name,
        position=blocks[0].param_index,
        group=table.groups[group_index],
        spec=table.specs[group_index],
        blocks=blocks,
        states=states,
        comm=comm,
        low_rank_reduction=low_rank_reduction,
        source=source,
        tally=tally,
    )


def check_layouts(layouts: list[Layout]) -> None:
    """Refuse per-layer updates under a layout whose engine shards gradients after the hooks."""
    for layout in layouts:
        if not layout.replicated:
            raise ValueError(
                f"per-layer updates under {layout.name}: the engine reduces and shards "
                "gradients after its own hooks, so a post-accumulate-grad hook never sees "
                "the averaged gradient; use optimizer.step() (per_layer=False)"
            )


@torch.no_grad()
def step_parameter(view: ParameterView, *, first: bool, last: bool, max_grad_norm: float) -> None:
    """Consume one micro-batch's gradient of ``view.param`` (see the module docstring);
    ``first``/``last``: the micro-batch's place in the step's accumulation."""
    param = view.param
    assert param.grad is not None
    projected = view.projection is not None
    _check_hook(view, first)
    distributed = view.comm.world_size > 1
    low_rank = distributed and projected and view.low_rank_reduction
    if view.projection is not None and view.projection.random:
        # Before anything changes: the device this step draws random bases on.
        where = buffer_device(view.comm, param.device) if low_rank else param.device
        # A generator: read only when the device type changes, not in every hook.
        states = (view.states[p] for p in group_params(view.group) if p in view.states)
        check_random_basis_device(view.projection, view.group, states, where.type, view.comm)
    if low_rank:
        consume_projected_low_rank(view, first, last, max_grad_norm)
        return
    if distributed and (projected or last):
        # A projected gradient is reduced every micro-batch (its owner sums it in low rank,
        # so no full gradient waits for the next one); a dense one accumulates locally and
        # is reduced once, at the last micro-batch.
        _reduce_to_owners(view)
    step = parameter_step(view)
    if projected or last:
        _count_consumed(view, step, projected and first, last)
    if param.grad is not None:
        if projected:
            _consume_projected(view, step, first, last, max_grad_norm)
        elif last:
            clip_by_norm_(param.grad, max_grad_norm)
            update_dense(step, 0)
            param.grad = None
    if not projected and last:
        settle_shared_blocks(step, [0])  # every rank: owners of cut row blocks agree
    if distributed and last:
        wait_all(broadcast_updated(step, 0))


def _check_hook(view: ParameterView, first: bool) -> None:
    """What a hook refuses before it consumes anything."""
    grad = view.param.grad
    assert grad is not None
    if view.projection is not None and grad.dim() != 2:
        raise flat_gradient_error(view.name, grad)
    if first and view.position in view.tally.finished:
        raise ValueError(
            f"{view.name}: a new per-layer step began before the previous step's non-finite "
            "verdict was read; call optimizer.finish_per_layer_step() after the backward "
            "pass that ends each step (PerLayerUpdates does)"
        )


def _reduce_to_owners(view: ParameterView) -> None:
    """The gradient summed onto the ranks owning its blocks, averaged there; dropped where
    this rank owns none of it."""
    handles: list[Any] = []
    exchange = OwnerExchange(view.comm)
    owned = reduce_to_owners(exchange, view.param, view.blocks, handles)
    exchange.wait()
    wait_all(handles)
    for rows in owned:
        rows.div_(view.comm.world_size)
    if not view.owns():
        view.param.grad = None


@torch.no_grad()
def finish_step(tally: NonFiniteTally | None, comm: Communicator, names: list[str]) -> None:
    """Read the non-finite verdict of the per-layer step that just ended (THE host sync of
    per-layer mode: one scalar all-reduce, one ``.item()``); raise the ValueError naming the
    parameters, on every rank, if any consumed a non-finite value. Nothing counted since the
    last call: nothing to read."""
    if tally is None or not tally.pending:
        return
    total = tally.counts.sum().reshape(1)
    wait_all([comm.all_reduce_sum(total)])
    if total.item() == 0:  # host sync (documented in GradNormLoRPAdamW)
        tally.reset()
        return
    # The error path only: which parameters, on any rank (one more all-reduce and read).
    counts = tally.counts.clone()
    wait_all([comm.all_reduce_sum(counts)])
    bad = [i for i, count in enumerate(counts.tolist()) if count > 0]
    counted = [tally.steps[i] for i in bad if i in tally.steps] or list(tally.steps.values())
    step = min(counted) if counted else "?"
    refresh = any(i in tally.refreshing for i in bad)
    tally.reset()
    raise per_layer_non_finite_error([names[i] for i in bad], step, refresh)


def _note(view: ParameterView, state: dict[str, Any] | None, first: bool, last: bool) -> bool:
    """Record (host side, for the error message) what this call consumes; whether its
    subspace is due now (projected, first micro-batch)."""
    tally, index = view.tally, view.position
    due = False
    if state is not None:
        tally.steps[index] = int(state.get("step", 0))
        due = first and view.projection is not None and refresh_due(view.projection, state)
        if due:
            tally.refreshing.add(index)
    if last:
        tally.finished.add(index)
    return due


def consume_projected_low_rank(
    view: ParameterView, first: bool, last: bool, max_grad_norm: float
) -> None:
    """Low-rank reduction (the model not in DDP): every rank projects its own micro-batch
    gradient with the shared basis and sums it locally; only the last micro-batch's summed
    low-rank gradient travels, to the owner, which broadcasts the direction every rank
    applies. A refresh reduces the first micro-batch's full gradient to the owner (the SVD)
    and broadcasts the basis."""
    param = view.param
    assert param.grad is not None
    state = view.states[param]
    whole = Fragment(
        start=0, numel=param.numel(), grad=param.grad.view(-1), master=param.data.view(-1)
    )
    step = _single_step(view, LOW_RANK_REDUCED, [whole], [state])
    view.tally.add(view.position, [param.grad])
    if _note(view, state, first, last) and not step.random:
        zero_non_finite_(param.grad)  # what reaches the owner's SVD is finite on every rank
    refreshed = refresh_subspaces(step, view.source, [0]) if first else []
    if not refreshed:
        check_bases(step, [0])
    proj = step.basis(0)
    grad = param.grad.reshape(step.proj_shape(0)).to(proj.dtype)
    partial = zero_non_finite_(project(grad, proj, step.side(0)).float())
    param.grad = None
    # Only the weights are needed from here on: no view of the freed gradient is kept.
    step.fragments[0] = replace(whole, grad=whole.grad.new_empty(0))
    if not first:
        partial = state.pop("low_rank_grad_sum").add_(partial)
    if not last:
        state["low_rank_grad_sum"] = partial
        return
    lows = low_rank_gradients(step, [0], partials={0: partial})
    for low in lows.values():  # the owner's: the mean over the ranks
        clip_by_norm_(low, max_grad_norm)
    apply_directions(step, [0], adam_directions(step, [0], lows))


def _single_step(
    view: ParameterView,
    layout: Layout,
    fragments: list[Fragment | None],
    states: list[dict[str, Any] | None],
) -> GroupStep:
    """The driver's view of the one parameter (see :func:`~gnlorp_dist.optim.stepping.group_steps`)."""
    param = view.param
    params = [ModelParameter(tensor=param, shape=tuple(param.shape), name=view.name)]
    return GroupStep(
        group=view.group,
        spec=view.spec,
        hyper=hyperparameters(view.group),
        layout=layout,
        params=params,
        fragments=fragments,
        states=states,
        active=[True],
        placements=place(layout, view.projection, params),
        blocks=[view.blocks],
        comm=view.comm,
        device=buffer_device(view.comm, param.device),
    )


def parameter_step(view: ParameterView) -> GroupStep:
    """The driver's view of one parameter of a replicated group: the owner's state only; a
    replicated step reads ``param.grad`` itself, so no view outlives ``param.grad = None``."""
    state = view.states[view.param] if view.owns() else None
    return _single_step(view, REPLICATED, [None], [state])


def _count_consumed(view: ParameterView, step: GroupStep, first: bool, last: bool) -> None:
    """Count what this rank consumes of the parameter (the owner's reduced gradient, or its
    row blocks) into the tally; zero the non-finite entries of a dense one (the update reads
    it next) and of a gradient a refresh takes its subspace from."""
    param = step.params[0].tensor
    consumed = (
        [grad for _name, grad in consumed_gradients([step])] if param.grad is not None else []
    )
    view.tally.add(view.position, consumed)
    due = _note(view, step.states[0], first, last)
    if consumed and ((due and not step.random) or not step.projected):
        for grad in consumed:
            zero_non_finite_(grad)


def _consume_projected(
    view: ParameterView, step: GroupStep, first: bool, last: bool, max_grad_norm: float
) -> None:
    param = step.params[0].tensor
    state = step.state(0)
    refreshed = refresh_subspaces(step, view.source, [0]) if first else []
    if not refreshed:
        check_bases(step, [0])
    low_rank_grad = zero_non_finite_(low_rank_gradients(step, [0])[0])
    param.grad = None
    if not first:
        low_rank_grad = state.pop("low_rank_grad_sum").add_(low_rank_grad)
    if not last:
        state["low_rank_grad_sum"] = low_rank_grad
        return
    clip_by_norm_(low_rank_grad, max_grad_norm)
    directions = adam_directions(step, [0], {0: low_rank_grad})
    apply_directions(step, [0], directions)
