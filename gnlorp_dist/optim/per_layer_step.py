"""Per-layer mode of :class:`GradNormLoRPAdamW`: one parameter updated inside the backward pass.

A mixin of the optimizer class (its methods run on the optimizer itself), kept apart so the
whole-step path and the per-parameter path read separately. :class:`PerLayerUpdates` calls
:meth:`PerLayerStep.step_parameter` from each parameter's post-accumulate-grad hook and
:meth:`PerLayerStep.finish_per_layer_step` once the backward pass that ends a step is over.

Non-finite gradients: each hook adds the count of what it consumes to its parameter's slot of a
device tally (:class:`NonFiniteTally`; no host sync), and ``finish_per_layer_step`` reads the
step's verdict once (one scalar all-reduce, one ``.item()``). Inside the backward pass nothing
waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import buffer_device, non_finite_count, wait_all
from gnlorp_dist.optim.data_parallel import reduce_to_owners
from gnlorp_dist.optim.driver import (
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
from gnlorp_dist.optim.layouts import LOW_RANK_REDUCED, REPLICATED, detect_layout
from gnlorp_dist.optim.nonfinite_guard import consumed_gradients, zero_non_finite_
from gnlorp_dist.optim.projection import project
from gnlorp_dist.optim.projector import check_random_basis_device, is_random
from gnlorp_dist.optim.refresh import refresh_due
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


class PerLayerStep:
    """``step_parameter`` and its helpers; mixed into :class:`GradNormLoRPAdamW`."""

    # Provided by GradNormLoRPAdamW.
    state: Any
    comm: Any
    _consolidated: Any
    ownership: Any
    owns: Any
    gradient_reduction: str
    group_and_name: Any
    groups_at_construction: Any
    model_params: Any
    _per_layer: Any
    _per_layer_tally: NonFiniteTally | None

    def attach_per_layer(self, per_layer: Any) -> None:
        """Called by :class:`PerLayerUpdates`; ``step()`` is refused while attached."""
        if self._per_layer is not None:
            raise ValueError("per-layer updates are already attached to this optimizer")
        for index, group in enumerate(self.groups_at_construction):
            layout = detect_layout(self.model_params[index], list(group["params"]))
            if not layout.replicated:
                raise ValueError(
                    f"per-layer updates under {layout.name}: the engine reduces and shards "
                    "gradients after its own hooks, so a post-accumulate-grad hook never sees "
                    "the averaged gradient; use optimizer.step() (per_layer=False)"
                )
        self._per_layer = per_layer

    def detach_per_layer(self) -> None:
        self._per_layer = None

    @property
    def per_layer(self) -> Any:
        """The attached :class:`PerLayerUpdates`, if any (then ``step()`` is refused)."""
        return self._per_layer

    @torch.no_grad()
    def step_parameter(
        self,
        param: Tensor,
        *,
        first_micro_batch: bool = True,
        last_micro_batch: bool = True,
        max_grad_norm: float = 0.0,
    ) -> None:
        """Per-layer mode: consume one micro-batch's ``param.grad`` and free it when possible.

        Called from a post-accumulate-grad hook (see :class:`PerLayerUpdates`). A projected
        parameter's gradient is projected at once and summed in a low-rank buffer (projection is
        linear, so the sum is exact); at a refresh step the subspace comes from the FIRST
        micro-batch's gradient, so no full-size gradient outlives its hook. A dense parameter
        lets autograd accumulate ``param.grad`` until the last micro-batch. At the last
        micro-batch the parameter is updated with exactly the math of :meth:`step`.

        ``max_grad_norm > 0`` clips, per parameter, the tensor Adam consumes (the summed
        low-rank gradient of a projected parameter, the full gradient of a dense one) to that
        norm: with updates inside the backward pass there is no global gradient norm.

        Over several ranks (the model NOT wrapped in DDP), each gradient is reduced to the rank
        that owns its state, the owner updates, and the updated blocks are broadcast before the
        hook returns, so every rank leaves the backward pass with the same weights.

        Non-finite gradients always raise, whatever ``on_nonfinite`` says, and only once the
        step is over: each call counts what it consumes (a projected parameter's gradient at
        every micro-batch, a dense parameter's accumulated rows at the last one) into a device
        tally, with no host sync; :meth:`finish_per_layer_step` (which :class:`PerLayerUpdates`
        calls when the backward pass that ends the step is over) reads the verdict once and
        raises the ValueError, naming the parameters, on every rank. By then every parameter of
        the step was updated, so the non-finite entries of what the update consumes (a
        projected parameter's low-rank gradient, the gradient a refresh takes its subspace
        from, a dense parameter's gradient) are taken as zero on the device: weights, moments
        and bases stay finite, and no rank fails alone in an SVD while the others wait.
        """
        self._consolidated = None
        group, name = self.group_and_name(param)
        if param.grad is None:
            return
        projected = "rank" in group
        if projected and param.grad.dim() != 2:
            raise flat_gradient_error(name, param.grad)
        index = self.ownership()[param][0].param_index
        tally = self._tally(param.device)
        if first_micro_batch and index in tally.finished:
            raise ValueError(
                f"{name}: a new per-layer step began before the previous step's non-finite "
                "verdict was read; call optimizer.finish_per_layer_step() after the backward "
                "pass that ends each step (PerLayerUpdates does)"
            )
        distributed = self.comm.world_size > 1
        low_rank = distributed and projected and self.gradient_reduction == "low_rank"
        if projected and is_random(group):
            # Before anything changes: the device this step draws random bases on.
            where = buffer_device(self.comm, param.device) if low_rank else param.device
            # A generator: read only when the device type changes, not in every hook.
            states = (self.state[p] for p in group["params"] if p in self.state)
            check_random_basis_device(group, states, where.type, self.comm)
        if low_rank:
            self._consume_projected_low_rank(
                group, param, name, index, first_micro_batch, last_micro_batch, max_grad_norm
            )
            return
        if distributed and (projected or last_micro_batch):
            # A projected gradient is reduced every micro-batch (its owner sums it in low rank,
            # so no full gradient waits for the next one); a dense one accumulates locally and
            # is reduced once, at the last micro-batch.
            handles: list[Any] = []
            owned = reduce_to_owners(self.comm, param, self.ownership()[param], handles)
            wait_all(handles)
            for rows in owned:
                rows.div_(self.comm.world_size)
            if not self.owns(param):
                param.grad = None
        step = self._parameter_step(group, param, name)
        if projected or last_micro_batch:
            self._count_consumed(step, index, projected and first_micro_batch, last_micro_batch)
        if param.grad is not None:
            if projected:
                self._consume_projected(step, first_micro_batch, last_micro_batch, max_grad_norm)
            elif last_micro_batch:
                clip_by_norm_(param.grad, max_grad_norm)
                update_dense(step, 0)
                param.grad = None
        if not projected and last_micro_batch:
            settle_shared_blocks(step, [0])  # every rank: owners of cut row blocks agree
        if distributed and last_micro_batch:
            wait_all(broadcast_updated(step, 0))

    def _tally(self, device: torch.device) -> NonFiniteTally:
        """This optimizer's tally, built at the first use on the communicator's device (or the
        first parameter's: one process)."""
        if self._per_layer_tally is None:
            total = sum(len(params) for params in self.model_params)
            counts = torch.zeros(
                total, dtype=torch.float64, device=buffer_device(self.comm, device)
            )
            self._per_layer_tally = NonFiniteTally(counts=counts)
        return self._per_layer_tally

    @torch.no_grad()
    def finish_per_layer_step(self) -> None:
        """Read the non-finite verdict of the per-layer step that just ended: THE host sync of
        per-layer mode (one scalar all-reduce over the ranks, one ``.item()``).

        :class:`PerLayerUpdates` calls it (on every rank) when the backward pass that ended the
        step is over, so the ValueError comes out of that ``backward()``. A caller that drives
        :meth:`step_parameter` itself calls it after each step's last hooks; a step begun
        without it is refused. Nothing counted since the last call: nothing to read."""
        tally = self._per_layer_tally
        if tally is None or not tally.pending:
            return
        total = tally.counts.sum().reshape(1)
        wait_all([self.comm.all_reduce_sum(total)])
        if total.item() == 0:  # host sync (documented in GradNormLoRPAdamW)
            tally.reset()
            return
        # The error path only: which parameters, on any rank (one more all-reduce and read).
        counts = tally.counts.clone()
        wait_all([self.comm.all_reduce_sum(counts)])
        bad = [i for i, count in enumerate(counts.tolist()) if count > 0]
        names = self._parameter_names()
        counted = [tally.steps[i] for i in bad if i in tally.steps] or list(tally.steps.values())
        step = min(counted) if counted else "?"
        refresh = any(i in tally.refreshing for i in bad)
        tally.reset()
        raise per_layer_non_finite_error([names[i] for i in bad], step, refresh)

    def _parameter_names(self) -> list[str]:
        """Every parameter's name, by its position over all groups."""
        names = []
        for group_index, group in enumerate(self.groups_at_construction):
            given = group.get("param_names")
            for i in range(len(self.model_params[group_index])):
                names.append(given[i] if given else f"param_groups[{group_index}][{i}]")
        return names

    def _note(
        self,
        index: int,
        state: dict[str, Any] | None,
        group: dict[str, Any],
        first: bool,
        last: bool,
    ) -> bool:
        """Record (host side, for the error message) what this call consumes; whether its
        subspace is due now (projected, first micro-batch)."""
        tally = self._per_layer_tally
        assert tally is not None  # counted into just before
        due = False
        if state is not None:
            tally.steps[index] = int(state.get("step", 0))
            due = first and "rank" in group and refresh_due(group, state)
            if due:
                tally.refreshing.add(index)
        if last:
            tally.finished.add(index)
        return due

    def _consume_projected_low_rank(
        self,
        group: dict[str, Any],
        param: Tensor,
        name: str,
        index: int,
        first: bool,
        last: bool,
        max_grad_norm: float,
    ) -> None:
        """Low-rank reduction (the model not in DDP): every rank projects its own micro-batch
        gradient with the shared basis and sums it locally; only the last micro-batch's summed
        low-rank gradient travels, to the owner, which broadcasts the direction every rank
        applies. A refresh reduces the first micro-batch's full gradient to the owner (the SVD)
        and broadcasts the basis."""
        assert param.grad is not None
        state = self.state[param]
        whole = Fragment(
            start=0, numel=param.numel(), grad=param.grad.view(-1), master=param.data.view(-1)
        )
        step = GroupStep(
            group=group,
            layout=LOW_RANK_REDUCED,
            params=[ModelParameter(tensor=param, shape=tuple(param.shape), name=name)],
            fragments=[whole],
            states=[state],
            active=[True],
            blocks=[self.ownership()[param]],
            comm=self.comm,
            device=buffer_device(self.comm, param.device),
        )
        self._tally(param.device).add(index, [param.grad])
        if self._note(index, state, group, first, last) and not step.random:
            zero_non_finite_(param.grad)  # what reaches the owner's SVD is finite on every rank
        refreshed = refresh_subspaces(step, self, [0]) if first else []
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

    def _parameter_step(self, group: dict[str, Any], param: Tensor, name: str) -> GroupStep:
        """The driver's view of one parameter of a replicated group (see :meth:`group_steps`)."""
        blocks = self.ownership()[param]
        owned = any(b.owner == self.comm.rank for b in blocks)
        model_param = ModelParameter(tensor=param, shape=tuple(param.shape), name=name)
        return GroupStep(
            group=group,
            layout=REPLICATED,
            params=[model_param],
            # A replicated step reads param.grad itself: no view outlives `param.grad = None`.
            fragments=[None],
            states=[self.state[param] if owned else None],
            active=[True],
            blocks=[blocks],
            comm=self.comm,
            device=buffer_device(self.comm, param.device),
        )

    def _count_consumed(self, step: GroupStep, index: int, first: bool, last: bool) -> None:
        """Count what this rank consumes of parameter ``index`` (the owner's reduced gradient,
        or its row blocks) into the tally; zero the non-finite entries of a dense one (the
        update reads it next) and of a gradient a refresh takes its subspace from."""
        param = step.params[0].tensor
        consumed = (
            [grad for _name, grad in consumed_gradients([step])] if param.grad is not None else []
        )
        self._tally(param.device).add(index, consumed)
        due = self._note(index, step.states[0], step.group, first, last)
        if consumed and ((due and not step.random) or not step.projected):
            for grad in consumed:
                zero_non_finite_(grad)

    def _consume_projected(
        self, step: GroupStep, first: bool, last: bool, max_grad_norm: float
    ) -> None:
        param = step.params[0].tensor
        state = step.state(0)
        refreshed = refresh_subspaces(step, self, [0]) if first else []
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
