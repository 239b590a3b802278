"""Per-layer updates: each parameter is stepped inside the backward pass.

A post-accumulate-grad hook on every trainable parameter hands its gradient to
:meth:`GradNormLoRPAdamW.step_parameter`, which updates the parameter and frees the gradient at
once, so the full set of gradients never exists at the same time. With gradient accumulation,
projected gradients are summed in low-rank buffers (see ``step_parameter``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

from gnlorp_dist.optim.adamw import GradNormLoRPAdamW
from gnlorp_dist.optim.spec import group_params


class PerLayerUpdates:
    """Attach per-layer updates to ``optimizer``'s parameters; ``remove()`` (or ``with``) detaches.

    Usage, with ``k`` micro-batches per optimizer step::

        per_layer = PerLayerUpdates(optimizer, accumulation_steps=k, max_grad_norm=1.0)
        for step in range(steps):
            for micro_batch in batches(step):
                (model(**micro_batch).loss / k).backward()  # parameters update in here
            scheduler.step()  # lr changes reach the next step's hooks through param_groups

    The learning-rate schedule, the per-parameter step counter and the subspace refresh gap
    behave exactly as with ``optimizer.step()`` (one update per ``k`` micro-batches, refreshes at
    steps 0, T, 2T, ...). Differences from the normal path, by necessity:

    - clipping: there is no global gradient norm inside the backward pass, so ``max_grad_norm``
      clips each parameter's update input on its own (``step_parameter`` documents which tensor);
    - with ``k > 1`` a refresh takes its subspace from the first micro-batch's gradient, not the
      sum (keeping the full sum would bring back the full gradients this mode exists to avoid).

    Over several ranks the model must NOT be wrapped in DDP: each hook reduces its gradient to
    the owning rank(s) itself (every micro-batch for a projected matrix, which its owner sums in
    low rank; at the last micro-batch for a dense tensor) and broadcasts the updated weights.
    Hooks fire in the same order on every rank because the models are identical.

    Non-finite gradients raise a ValueError naming the parameters, on every rank, out of the
    ``backward()`` call that ends the step (the last micro-batch's): the hooks count non-finite
    values on the device and the verdict is read once, when that backward pass is over (a
    callback queued on it calls :meth:`GradNormLoRPAdamW.finish_per_layer_step`). By then the
    step has updated every parameter, with non-finite entries taken as zero so nothing
    becomes NaN (see ``step_parameter``); resume from a checkpoint.

    Every trainable parameter must receive a gradient in every backward pass (the hooks count
    micro-batches per parameter). ``optimizer.step()`` is refused while attached: the backward
    pass already stepped, and a second step would be silent double counting.
    """

    def __init__(
        self,
        optimizer: GradNormLoRPAdamW,
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float = 0.0,
    ) -> None:
        if not isinstance(optimizer, GradNormLoRPAdamW):
            raise ValueError(
                f"per-layer updates need a GradNormLoRPAdamW, got {type(optimizer).__name__}; "
                "other optimizers have no per-parameter step"
            )
        if optimizer.comm.world_size > 1 and max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm={max_grad_norm} with per-layer updates over "
                f"{optimizer.comm.world_size} ranks: a dense tensor's gradient is split over its "
                "row-block owners, so there is no per-parameter norm to clip by; use 0"
            )
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
            raise ValueError(f"accumulation_steps={accumulation_steps!r} must be an integer >= 1")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r} must be an integer >= 1")
        if not max_grad_norm >= 0.0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be >= 0 (0 disables)")
        optimizer.attach_per_layer(self)  # refuses a second attachment and sharded layouts
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = float(max_grad_norm)
        self._micro_batch: dict[Tensor, int] = {}
        self._verdict_queued_for: int | None = None
        """The autograd graph task whose end reads the step's verdict (one per backward)."""
        self._handles: list[RemovableHandle] = []
        for group in optimizer.param_groups:
            for param in group_params(group):
                if param.requires_grad:
                    self._micro_batch[param] = 0
                    self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, param: Tensor) -> None:
        index = self._micro_batch[param]
        last = index == self.accumulation_steps - 1
        if last:
            # The step ends in this backward pass: its verdict is read once, after the last hook.
            task = torch._C._current_graph_task_id()
            if task != self._verdict_queued_for:
                self._verdict_queued_for = task
                Variable._execution_engine.queue_callback(self.optimizer.finish_per_layer_step)
        self.optimizer.step_parameter(
            param,
            first_micro_batch=index == 0,
            last_micro_batch=last,
            max_grad_norm=self.max_grad_norm,
        )
        self._micro_batch[param] = (index + 1) % self.accumulation_steps

    def remove(self) -> None:
        """Detach the hooks; refused in the middle of an accumulation cycle."""
        pending = [p for p, index in self._micro_batch.items() if index != 0]
        if pending:
            raise ValueError(
                f"{len(pending)} parameters are in the middle of an accumulation cycle of "
                f"{self.accumulation_steps} micro-batches; finish the step before removing"
            )
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.optimizer.detach_per_layer()

    def __enter__(self) -> PerLayerUpdates:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.remove()
