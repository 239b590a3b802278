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
from gnlorp_dist.optim.validation import flat_gradient_error, non_finite_error
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
        if distributed and projected and first_micro_batch:
            # Before anything changes: a refresh with a non-finite gradient raises on every rank.
            self._agree_on_refresh_verdict(group, param, name)
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
            if self.comm.world_size == 1:
                self._check_refresh_gradient(param, name)
            # Over several ranks _agree_on_refresh_verdict has checked it already.
            self._refresh(group, param)
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

    def _agree_on_refresh_verdict(self, group: dict[str, Any], param: Tensor, name: str) -> None:
        """Every rank raises if the owner has a non-finite gradient due for a refresh (only the
        owner knows whether it is due, so every rank joins this one-scalar verdict)."""
        due = param.grad is not None and self._refresh_due(group, param)
        if non_finite_on_any_rank(self.comm, [param.grad] if due else [], param.device):
            raise non_finite_error([name], self.state, [(None, param, name)])

    def _check_refresh_gradient(self, param: Tensor, name: str) -> None:
        # Host sync: once per matrix at its refresh (per-layer mode, one process).
        if not bool(torch.isfinite(param.grad).all()):
            raise non_finite_error([name], self.state, [(None, param, name)])
