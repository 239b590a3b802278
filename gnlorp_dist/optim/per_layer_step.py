"""Per-layer mode of :class:`GradNormLoRPAdamW`: one parameter updated inside the backward pass.

A mixin of the optimizer class (its methods run on the optimizer itself), kept apart so the
whole-step path and the per-parameter path read separately. :class:`PerLayerUpdates` calls
:meth:`PerLayerStep.step_parameter` from each parameter's post-accumulate-grad hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import non_finite_on_any_rank, wait_all
from gnlorp_dist.optim.functional import clip_by_norm_
from gnlorp_dist.optim.validation import (
    flat_gradient_error,
    non_finite_error,
    non_finite_step_error,
)
from gnlorp_dist.projection import project, projection_side


class PerLayerStep:
    """``step_parameter`` and its helpers; mixed into :class:`GradNormLoRPAdamW`."""

    # Provided by GradNormLoRPAdamW.
    state: Any
    comm: Any
    _consolidated: Any

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
        if distributed and (projected or last_micro_batch):
            # A projected gradient is reduced every micro-batch (its owner sums it in low rank,
            # so no full gradient waits for the next one); a dense one accumulates locally and
            # is reduced once, at the last micro-batch.
            self._reduce_gradients_to_owners([(group, param, name)])
            if not self.owns(param):
                param.grad = None
        if projected or last_micro_batch:
            # Before anything changes: a non-finite gradient raises on every rank.
            self._check_parameter_gradient(group, param, name, projected and first_micro_batch)
        if param.grad is not None:
            if projected:
                self._consume_projected(
                    group, param, name, first_micro_batch, last_micro_batch, max_grad_norm
                )
            elif last_micro_batch:
                clip_by_norm_(param.grad, max_grad_norm)
                self._update_dense(group, param, self.owned_block(param))
                param.grad = None
        if distributed and last_micro_batch:
            wait_all(self._broadcast_blocks(param))

    def _check_parameter_gradient(
        self, group: dict[str, Any], param: Tensor, name: str, may_refresh: bool
    ) -> None:
        """Every rank raises if the owner's gradient (this rank's block of it) is non-finite
        (only the owner holds the reduced gradient, so every rank joins this one-scalar
        verdict)."""
        grad = param.grad
        if grad is not None and "rank" not in group and self.comm.world_size > 1:
            block = self.owned_block(param)
            grad = grad if block.whole else grad[block.row_start : block.row_stop]
        if not non_finite_on_any_rank(self.comm, [] if grad is None else [grad], param.device):
            return
        if may_refresh and param.grad is not None and self._refresh_due(group, param):
            raise non_finite_error([name], self.state, [(None, param, name)])
        step = int(self.state[param].get("step", 0)) if param in self.state else 0
        raise non_finite_step_error([name], step)

    def _consume_projected(
        self,
        group: dict[str, Any],
        param: Tensor,
        name: str,
        first: bool,
        last: bool,
        max_grad_norm: float,
    ) -> None:
        state = self.state[param]
        if first and self._refresh_due(group, param):
            self._refresh(group, param)  # its gradient was checked by _check_parameter_gradient
        side = projection_side(param.shape, group["proj_type"])
        low_rank_grad = project(param.grad, state["proj"], side)
        param.grad = None
        if not first:
            low_rank_grad = state.pop("low_rank_grad_sum").add_(low_rank_grad)
        if not last:
            state["low_rank_grad_sum"] = low_rank_grad
            return
        clip_by_norm_(low_rank_grad, max_grad_norm)
        self._update_projected(group, param, low_rank_grad)
