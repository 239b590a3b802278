"""Per-layer mode of :class:`GradNormLoRPAdamW`: one parameter updated inside the backward pass.

A mixin of the optimizer class (its methods run on the optimizer itself), kept apart so the
whole-step path and the per-parameter path read separately. :class:`PerLayerUpdates` calls
:meth:`PerLayerStep.step_parameter` from each parameter's post-accumulate-grad hook.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import buffer_device, non_finite_on_any_rank, wait_all
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
from gnlorp_dist.optim.nonfinite_guard import consumed_gradients
from gnlorp_dist.optim.refresh import refresh_due
from gnlorp_dist.optim.validation import (
    flat_gradient_error,
    non_finite_refresh_error,
    non_finite_step_error,
)
from gnlorp_dist.projection import project


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

        Non-finite gradients always raise here, whatever ``on_nonfinite`` says: the parameters
        update one by one inside the backward pass, so skipping this one would leave those
        already updated at this step changed and the rest not (a step that is neither taken nor
        skipped). The check (one fused count, one scalar verdict over ranks, one ``.item()``)
        runs on a projected parameter's gradient at every micro-batch before it is projected or
        refreshes the subspace, on a dense parameter's accumulated gradient at the last
        micro-batch before its update: the ValueError comes before this parameter changes, on
        every rank.
        """
        self._consolidated = None
        group, name = self.group_and_name(param)
        if param.grad is None:
            return
        projected = "rank" in group
        if projected and param.grad.dim() != 2:
            raise flat_gradient_error(name, param.grad)
        distributed = self.comm.world_size > 1
        if distributed and projected and self.gradient_reduction == "low_rank":
            self._consume_projected_low_rank(
                group, param, name, first_micro_batch, last_micro_batch, max_grad_norm
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
            # Before anything changes: a non-finite gradient raises on every rank.
            self._check_parameter_gradient(step, projected and first_micro_batch)
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

    def _consume_projected_low_rank(
        self,
        group: dict[str, Any],
        param: Tensor,
        name: str,
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
        if non_finite_on_any_rank(self.comm, [param.grad], param.device):
            step_count = int(state.get("step", 0))
            if first and refresh_due(group, state):
                raise non_finite_refresh_error([name], step_count)
            raise non_finite_step_error([name], step_count)
        refreshed = refresh_subspaces(step, self, [0]) if first else []
        if not refreshed:
            check_bases(step, [0])
        proj = step.basis(0)
        grad = param.grad.reshape(step.proj_shape(0)).to(proj.dtype)
        partial = project(grad, proj, step.side(0)).float()
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

    def _check_parameter_gradient(self, step: GroupStep, may_refresh: bool) -> None:
        """Every rank raises if the owner's gradient (this rank's block of it) is non-finite
        (only the owner holds the reduced gradient, so every rank joins this one-scalar
        verdict)."""
        param, name = step.params[0].tensor, step.params[0].name
        consumed = (
            [grad for _name, grad in consumed_gradients([step])] if param.grad is not None else []
        )
        if not non_finite_on_any_rank(self.comm, consumed, param.device):
            return
        state = step.states[0]
        step_count = int(state.get("step", 0)) if state is not None else 0
        if may_refresh and state is not None and refresh_due(step.group, state):
            raise non_finite_refresh_error([name], step_count)
        raise non_finite_step_error([name], step_count)

    def _consume_projected(
        self, step: GroupStep, first: bool, last: bool, max_grad_norm: float
    ) -> None:
        param = step.params[0].tensor
        state = step.state(0)
        refreshed = refresh_subspaces(step, self, [0]) if first else []
        if not refreshed:
            check_bases(step, [0])
        low_rank_grad = low_rank_gradients(step, [0])[0]
        param.grad = None
        if not first:
            low_rank_grad = state.pop("low_rank_grad_sum").add_(low_rank_grad)
        if not last:
            state["low_rank_grad_sum"] = low_rank_grad
            return
        clip_by_norm_(low_rank_grad, max_grad_norm)
        directions = adam_directions(step, [0], {0: low_rank_grad})
        apply_directions(step, [0], directions)
