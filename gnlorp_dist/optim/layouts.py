"""Layouts: where this rank holds each matrix of a param group, and what travels because of it.

The step driver (:mod:`gnlorp_dist.optim.driver`) runs the same phases for every engine; a
layout is the only thing that differs between them. It answers, for one param group:

- which run of each parameter's row-major elements this rank holds (a
  :class:`~gnlorp_dist.optim.fragments.Fragment`: its gradient and its master weights);
- whether those runs are the whole parameter on every rank with the same averaged gradient
  (``replicated``: one process, DDP), or disjoint pieces that together make the parameter
  (``replicated = False``: DeepSpeed ZeRO, FSDP2);
- whether the runs start and end on row boundaries (``row_aligned``: FSDP2), which lets a
  right-projected matrix update without any communication between refreshes;
- where its optimizer state is keyed (``flattened``: the engine replaced the group's parameters
  by flat tensors, so states are keyed by parameter name, not by tensor).

The engines' layouts live above this layer (``gnlorp_dist.integrations``), so the optimizer
cannot import them: the package root, ``gnlorp_dist/__init__.py``, which Python runs before any
submodule, hands them over in one explicit call, :func:`use_engine_layouts`. No module
registers itself on import. A group no engine layout claims is replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

from gnlorp_dist.optim.fragments import Fragment, ModelParameter


class Layout(Protocol):
    """How an engine laid one param group's parameters out on this rank."""

    name: str
    """Shown in messages, e.g. ``"DeepSpeed ZeRO-2"``."""
    replicated: bool
    """Every rank holds every whole parameter."""
    averaged: bool
    """The gradients handed to the optimizer are already averaged over the ranks (DDP and the
    engines); False: each rank's own (the optimizer reduces what it needs)."""
    row_aligned: bool
    """Runs cover whole rows only (a row is never split between ranks)."""
    flattened: bool
    """The engine replaced the group's parameters: states are keyed ``zero/<name>``."""

    def true_shape(self, param: Tensor) -> tuple[int, ...]:
        """The parameter's shape before the engine partitioned it."""
        ...

    def has_gradient(self, param: Tensor) -> bool:
        """Whether ``param`` takes part in this step (the same answer on every rank)."""
        ...

    def check_group(self, group: dict[str, Any], group_index: int) -> None:
        """A ValueError naming the option when the group asks for what this layout cannot run
        (called when the group is added, before any step)."""
        ...

    def fragments(
        self, params: list[ModelParameter], engine_params: list[Tensor], rank: int, world_size: int
    ) -> list[Fragment | None]:
        """This rank's run of each parameter (None where it holds none of it, or no gradient)."""
        ...

    def state_for_saving(
        self, param: ModelParameter, group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        """``state`` as ``state_dict()`` hands it out (e.g. local shards as DTensors)."""
        ...

    def state_from_loading(
        self, param: ModelParameter, group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        """The inverse of :meth:`state_for_saving` for a loaded state."""
        ...


class LayoutDefaults:
    """What most layouts answer alike; a layout class may derive from it and override."""

    def has_gradient(self, param: Tensor) -> bool:
        return param.grad is not None

    def check_group(self, group: dict[str, Any], group_index: int) -> None:
        return None

    def state_for_saving(
        self, param: ModelParameter, group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        return state

    def state_from_loading(
        self, param: ModelParameter, group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        return state


class ReplicatedLayout(LayoutDefaults):
    """One process, or data parallelism: every rank holds every parameter whole.

    ``averaged`` (one process, DDP): the driver lets the owner of each block
    (:mod:`gnlorp_dist.optim.ownership`) update it and broadcasts the result, so no rank repeats
    another's work. Not averaged (a model not wrapped in DDP, ``gradient_reduction="low_rank"``):
    each rank projects its own gradient with the shared basis and only the low-rank sums travel
    to the owner, which broadcasts the low-rank direction that every rank applies.
    """

    replicated = True
    row_aligned = True
    flattened = False

    def __init__(self, *, averaged: bool) -> None:
        self.averaged = averaged
        self.name = "replicated" if averaged else "data parallel, low-rank reduction"

    def true_shape(self, param: Tensor) -> tuple[int, ...]:
        return tuple(param.shape)

    def fragments(
        self, params: list[ModelParameter], engine_params: list[Tensor], rank: int, world_size: int
    ) -> list[Fragment | None]:
        return [whole_fragment(p.tensor) if p.tensor.grad is not None else None for p in params]


def whole_fragment(tensor: Tensor) -> Fragment:
    """A whole parameter as one run of its row-major elements: flat views of the tensor and its
    gradient. A gradient that is not contiguous (a transposed one) is replaced by its row-major
    copy first (same values), so the reductions and clipping that work on ``tensor.grad`` in
    place still act on what the step reads; weights that are not contiguous are updated
    through a row-major copy, written back after the update."""
    grad, data = tensor.grad, tensor.data
    assert grad is not None
    if not grad.is_contiguous():
        grad = tensor.grad = grad.contiguous()
    flat_grad = grad.view(-1)
    if data.is_contiguous():
        return Fragment(start=0, numel=tensor.numel(), grad=flat_grad, master=data.view(-1))
    master = data.reshape(-1)  # a copy: the elements are not one run in memory
    copied_at = master._version

    def write_back() -> None:
        # Only a placement that updates through the run changed the copy (the owners and the
        # dense path update the tensor itself): writing an untouched copy would undo them.
        if master._version != copied_at:
            data.copy_(master.view(data.shape))

    return Fragment(
        start=0, numel=tensor.numel(), grad=flat_grad, master=master, write_back=write_back
    )


REPLICATED = ReplicatedLayout(averaged=True)
LOW_RANK_REDUCED = ReplicatedLayout(averaged=False)

LayoutDetector = Callable[[list[Tensor], list[Tensor]], "Layout | None"]
"""Given a group's model parameters and what the engine put in the group, a layout or None.

Called at construction (``engine_params`` are the model parameters then) and at every step; a
detector refuses, with a ValueError naming the option, a layout it recognises but cannot run."""

_engine_layouts: tuple[LayoutDetector, ...] = ()


def use_engine_layouts(*detectors: LayoutDetector) -> None:
    """Set the engine layouts :func:`detect_layout` tries, in order (``gnlorp_dist/__init__.py``
    sets DeepSpeed ZeRO's and FSDP2's). It replaces the table, never appends to it: the same
    call twice is the call once, and the table never depends on what was imported when."""
    global _engine_layouts
    _engine_layouts = tuple(detectors)


def engine_layouts() -> tuple[LayoutDetector, ...]:
    """The engine layouts :func:`detect_layout` tries, in order."""
    return _engine_layouts


def detect_layout(model_params: list[Tensor], engine_params: list[Tensor]) -> Layout:
    """The engine layout that explains ``engine_params``, else :data:`REPLICATED`."""
    for detector in _engine_layouts:
        layout = detector(model_params, engine_params)
        if layout is not None:
            return layout
    # The model's tensors, or copies of the same shapes (DeepSpeed ZeRO-0 steps fp32 copies).
    if [tuple(p.shape) for p in model_params] == [tuple(p.shape) for p in engine_params]:
        return REPLICATED
    raise ValueError(
        f"a param group reached GradNormLoRPAdamW.step() holding {len(engine_params)} tensors in "
        f"place of its {len(model_params)} parameters, in a layout no engine integration "
        "explains (DeepSpeed ZeRO and FSDP2 are known: `import gnlorp_dist` hands them to the optimizer); "
        "build the optimizer from the parameters the engine trains"
    )
