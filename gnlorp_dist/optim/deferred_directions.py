"""Low-rank directions applied in the next forward pass, so their broadcasts overlap it.

Under the low-rank reduction every rank applies each projected matrix's direction to its own
copy of the weights, after the owner's broadcast arrives. ``step()`` normally waits for every
broadcast and applies every direction before it returns, so the broadcasts hide behind nothing.
With :meth:`~gnlorp_dist.GradNormLoRPAdamW.applying_directions_in_forward` the step launches the
broadcasts (bucketed: :mod:`gnlorp_dist.optim.owner_exchange`) and returns; each matrix's update
is kept here as a closure, and a forward pre-hook on the module that holds the matrix waits for
its bucket and applies it just before the module runs. Layer ``k``'s broadcast thus overlaps the
forward of layers ``0 .. k-1``; all buckets are in flight from the end of the step, so each
layer's wait also prefetches the ones behind it.

The closures run the same :func:`~gnlorp_dist.optim.driver.update_weights` on the same inputs
(the step's learning rate and step count are captured when the step runs), so the weights are
bitwise those of the step that applies them at once. Everything that reads the weights settles
first: the next ``step()``, the optimizer's and the model's ``state_dict()`` (a pre-hook), and
:meth:`PendingDirections.settle` for anything else (evaluation runs forward: its hooks settle).
No host sync is added: a wait is on a collective's handle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class PendingDirections:
    """The updates a step left for the next forward, by the parameter they change."""

    def __init__(self) -> None:
        self._updates: dict[int, tuple[Tensor, Callable[[], None]]] = {}
        """id(parameter) -> (the parameter, its update)."""
        self.models = 0
        """Models whose forward applies them (:class:`ForwardHooks` installed): none, and a step
        applies its directions at once."""

    def defer(self, param: Tensor, update: Callable[[], None]) -> None:
        """Keep ``update`` of ``param`` until it is settled (a parameter holds one at a time:
        every step settles before it runs)."""
        assert id(param) not in self._updates, "a direction deferred twice without a settle"
        self._updates[id(param)] = (param, update)

    def __len__(self) -> int:
        return len(self._updates)

    def __deepcopy__(self, memo: dict[int, object]) -> PendingDirections:
        return PendingDirections()  # a copied optimizer's weights are its own: nothing pending

    def __getstate__(self) -> dict[str, object]:
        return PendingDirections().__dict__  # a pickle, like a copy, holds nothing pending

    @torch.no_grad()
    def settle(self, params: Iterable[Tensor] | None = None) -> None:
        """Apply the pending updates of ``params`` (all of them when None), in the order they
        were deferred."""
        if not self._updates:
            return
        if params is None:
            chosen = list(self._updates)
        else:
            wanted = {id(p) for p in params}
            chosen = [key for key in self._updates if key in wanted]
        for key in chosen:
            _param, update = self._updates.pop(key)
            update()


class ForwardHooks:
    """The hooks :meth:`~gnlorp_dist.GradNormLoRPAdamW.applying_directions_in_forward` installs
    on a model: a forward pre-hook on every module that holds parameters directly, and a
    ``state_dict`` pre-hook on the model."""

    def __init__(self, model: nn.Module, pending: PendingDirections) -> None:
        self.pending = pending
        pending.models += 1
        self._handles: list[RemovableHandle] = []
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own:
                self._handles.append(module.register_forward_pre_hook(self._settler(own)))
        self._handles.append(model.register_state_dict_pre_hook(self._settle_all))

    def _settler(self, params: list[Tensor]) -> Callable[..., None]:
        def settle(_module: nn.Module, _args: object) -> None:
            self.pending.settle(params)

        return settle

    def _settle_all(self, *_args: object, **_kwargs: object) -> None:
        self.pending.settle()

    def remove(self) -> None:
        """Remove the hooks, applying whatever is still pending first."""
        self.pending.settle()
        if self._handles:
            self.pending.models -= 1
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
