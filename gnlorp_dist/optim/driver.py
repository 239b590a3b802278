"""The one step driver: the same phases for every layout (one process, DDP, ZeRO, FSDP2).

A param group's step is a :class:`GroupStep`: its parameters, this rank's run of each
(:mod:`gnlorp_dist.optim.layouts`), their states and the owner of each projected matrix. The
phases below never ask which engine runs; they ask the layout two questions (is every parameter
whole and averaged on every rank? do runs cover whole rows?) and the answers pick where the
low-rank work of each matrix happens:

- ``"owner"`` (replicated layouts): the owner holds the whole gradient (the parameter's own
  ``.grad``: no view of it is kept, so per-layer mode can free it mid-step); it alone
  refreshes, projects, keeps the moments and updates the weights, which the caller then
  broadcasts (:func:`broadcast_updated`);
- ``"reduce"`` (runs cut anywhere, or left-projected matrices, whose low-rank gradient
  ``P^T G`` sums over every row, or data parallelism with each rank's own gradient, the
  low-rank reduction): each rank projects its run (or its whole gradient), the partial sums are
  reduced to the owner (averaged there when the gradients were each rank's own), which alone
  keeps the moments and broadcasts the normalised direction; every rank back-projects it onto
  its own run;
- ``"rows"`` (right-projected matrices in row-aligned runs, FSDP2): ``G P^T`` row by row needs
  nothing from other ranks, so each rank keeps the moments of its rows and updates them alone.

Phases of a projected group: :func:`refresh_subspaces` (due matrices only: the whole gradient is
assembled on the owner, the SVD runs once in the job, the basis is broadcast to the ranks that
hold runs), :func:`low_rank_gradients`, :func:`adam_directions`, :func:`apply_directions`. Dense
groups: :func:`update_dense` on the run (or owned row block) each rank holds. Per-layer mode runs
the same phase functions for one matrix at a time (:mod:`gnlorp_dist.optim.per_layer_step`).

One refresh rule (:func:`refresh_due`), one state per matrix (``GroupStep.states``), one step
counter per matrix, counted on every rank that keeps state for it, so every rank agrees on when a
refresh (a collective) is due.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from gnlorp_dist.optim import projfactor
from gnlorp_dist.optim.block_grid import agree_shared_blocks
from gnlorp_dist.optim.comm import Communicator, Handle, clip_coefficient, wait_all
from gnlorp_dist.optim.dense import update_dense_block
from gnlorp_dist.optim.fragments import (
    Fragment,
    ModelParameter,
    back_project_fragment,
    covering_rows,
    project_fragment,
)
from gnlorp_dist.optim.functional import (
    apply_factored_update_,
    apply_projected_update_,
    normalized_low_rank_update,
    update_moments_,
)
from gnlorp_dist.optim.layouts import Layout
from gnlorp_dist.optim.ownership import OwnedBlock
from gnlorp_dist.optim.projector import (
    back_divisor,
    group_side,
    is_factored,
    is_random,
    projected_shape,
    regenerate_basis,
)
from gnlorp_dist.optim.quantized import (
    FIRST_MOMENT_ONLY,
    MIN_8BIT_NUMEL,
    MOMENT_KEYS,
    MomentStore,
    SharedBlock,
)
from gnlorp_dist.optim.quantized_basis import drop_basis, load_basis, store_basis
from gnlorp_dist.optim.refresh import (
    keep_next_refresh,
    lazy_refresh,
    next_refresh_step,
    refresh_due,
)
from gnlorp_dist.projection import low_rank_shape, project, project_back, projection_shape

Placement = Literal["owner", "reduce", "rows"]


class BasisSource(Protocol):
    def compute_basis(
        self, group: dict[str, Any], grad_MN: Tensor, state: dict[str, Any]
    ) -> Tensor: ...


@dataclass(kw_only=True)
class GroupStep:
    """One param group as one ``step()`` sees it on this rank."""

    group: dict[str, Any]
    """The group dict (hyperparameters)."""
    layout: Layout
    """Where this rank holds each parameter."""
    params: list[ModelParameter]
    """The group's parameters, with their true shapes and names."""
    fragments: list[Fragment | None]
    """This rank's run of each parameter (None: none of it, or no gradient)."""
    states: list[dict[str, Any] | None]
    """The optimizer state of each parameter on this rank (None: this rank keeps none)."""
    active: list[bool]
    """Whether each parameter takes part in this step (it has a gradient; the same answer on
    every rank)."""
    reduced: dict[int, Tensor] = field(default_factory=dict)
    """Low-rank gradients whose reduce to the owner already ran (started inside backward by
    :mod:`gnlorp_dist.optim.backward_reduction`): summed over the ranks, not yet averaged."""
    blocks: list[list[OwnedBlock]]
    """Each parameter's ownership blocks (a projected matrix: one, its owner)."""
    comm: Communicator
    """The ranks of the job."""
    device: torch.device
    """Where buffers that go through collectives live."""
    shared: dict[int, list[SharedBlock]] = field(default_factory=dict)
    """8-bit blocks this rank's runs share with other ranks', waiting for their agreed scales
    (:func:`settle_shared_blocks`)."""
    counted: dict[int, int] = field(default_factory=dict)
    """Each matrix's step count before this update's increment (:func:`adam_directions`): a
    random basis is the one of the window of the update being taken, also after the count."""
    random_bases: dict[int, Tensor] = field(default_factory=dict)
    """Random bases regenerated during this step (transient: never in the state)."""

    @property
    def projected(self) -> bool:
        return "rank" in self.group

    def owner(self, index: int) -> int:
        (block,) = self.blocks[index]
        return block.owner

    def side(self, index: int) -> Any:
        return group_side(self.params[index].shape, self.group)

    @property
    def random(self) -> bool:
        """Random bases (VLoRP): regenerated from seeds, never stored, refreshed or sent."""
        return is_random(self.group)

    @property
    def factored(self) -> bool:
        """ProjFactor's factored second moment (:mod:`gnlorp_dist.optim.projfactor`)."""
        return is_factored(self.group)

    def proj_shape(self, index: int) -> tuple[int, int]:
        """The shape parameter ``index`` is projected in (``(M c, N / c)`` with granularity:
        the same flat indices, so runs of the matrix are runs of it)."""
        return projected_shape(self.params[index].shape, self.group)

    @property
    def back_divisor(self) -> int:
        return back_divisor(self.group)

    @property
    def owner_alone(self) -> bool:
        """Replicated, averaged gradients: owners update and broadcast the weights."""
        return self.layout.replicated and self.layout.averaged

    def placement(self, index: int) -> Placement:
        if self.layout.replicated:
            return "owner" if self.layout.averaged else "reduce"
        if self.layout.row_aligned and self.side(index) == "right":
            return "rows"
        return "reduce"

    def holds(self, index: int) -> bool:
        """Whether this rank updates (part of) parameter ``index``'s weights itself."""
        if self.owner_alone:  # the tensor itself, whole: its owner updates it
            return self.active[index] and any(b.owner == self.comm.rank for b in self.blocks[index])
        return self.fragments[index] is not None

    def wire_dtype(self, index: int) -> torch.dtype:
        """The dtype parameter ``index``'s low-rank traffic travels in: the weights' under the
        low-rank reduction (bf16 weights send bf16, as DDP all-reduces bf16 gradients; the
        owner sums and keeps the moments in float32), float32 between an engine's fp32 runs."""
        if self.layout.replicated and not self.layout.averaged:
            return self.params[index].tensor.dtype
        return torch.float32

    def state(self, index: int) -> dict[str, Any]:
        state = self.states[index]
        assert state is not None, f"{self.params[index].name}: no state on this rank"
        return state

    def basis(self, index: int) -> Tensor:
        """Parameter ``index``'s projection basis (restored from its codes under ``proj_bits``,
        in the dtype it was computed in: the gradient's on an owner, else float32)."""
        owner = self.placement(index) == "owner"
        dtype = self.params[index].tensor.dtype if owner else torch.float32
        if not self.random:
            return load_basis(self.state(index), dtype)
        if index not in self.random_bases:
            (block, *_) = self.blocks[index]
            window = self.counted.get(index, int(self.state(index).get("step", 0)))
            device = self.params[index].tensor.device if owner else self.device
            self.random_bases[index] = regenerate_basis(
                self.group,
                block.param_index,
                window,
                self.params[index].shape,
                dtype=dtype,
                device=device,
            )
        return self.random_bases[index]

    def moments_numel(self, index: int) -> int:
        """Elements of one Adam moment of the whole parameter ``index`` (low-rank if projected)."""
        if self.projected:
            shape = self.proj_shape(index)
            return math.prod(low_rank_shape(shape, self.group["rank"], self.side(index)))
        return math.prod(self.params[index].shape)

    def cut_8bit(self, index: int) -> bool:
        """Whether parameter ``index``'s 8-bit moments may be cut between ranks (the same answer
        on every rank): its blocks' scales are then agreed at the end of the step."""
        if self.group["bits"] != 8 or self.comm.world_size == 1:
            return False
        if self.moments_numel(index) < self.group.get("min_8bit_size", MIN_8BIT_NUMEL):
            return False
        if self.projected:
            return self.placement(index) == "rows"
        return not self.layout.replicated or len(self.blocks[index]) > 1


def steps_taken(step: GroupStep, indices: list[int]) -> list[int]:
    return [int(step.state(i).get("step", 0)) for i in indices if step.states[i] is not None]


def refresh_subspaces(
    step: GroupStep, source: BasisSource, indices: list[int] | None = None
) -> list[int]:
    """New bases for the due matrices among ``indices`` (default: all); returns those refreshed.

    Replicated: the owner holds the whole gradient and refreshes alone. Otherwise the whole
    gradient is summed onto the owner from the zero-padded runs (each element comes from the
    one rank holding it, so the sum is exact), the owner computes the basis (once in the job)
    and broadcasts it; ranks that hold runs keep it. The gradients were verified finite before.
    """
    comm = step.comm
    indices = list(range(len(step.params))) if indices is None else indices
    if step.random:
        return []  # regenerated from the window's seed by every rank that needs it
    if step.owner_alone:
        due = [
            i
            for i in indices
            if step.states[i] is not None and refresh_due(step.group, step.state(i))
        ]
        for i in due:
            grad = step.params[i].tensor.grad
            assert grad is not None, step.params[i].name
            state = step.state(i)
            basis = source.compute_basis(step.group, grad.reshape(step.proj_shape(i)), state)
            old = step.basis(i) if "proj" in state and lazy_refresh(step.group) else None
            keep_next_refresh(state, next_refresh_step(step.group, state, old, basis, step.side(i)))
            store_basis(state, basis, step.group.get("proj_bits"))
        return due
    due = [i for i in indices if refresh_due(step.group, step.state(i))]
    full_grads: dict[int, Tensor] = {}
    handles: list[Handle | None] = []
    for i in due:
        numel = math.prod(step.params[i].shape)
        full = torch.zeros(numel, dtype=step.wire_dtype(i), device=step.device)
        fragment = step.fragments[i]
        if fragment is not None:
            full[fragment.start : fragment.start + fragment.numel] = fragment.grad[: fragment.numel]
        handles.append(comm.reduce_sum(full, dst=step.owner(i)))
        if step.owner(i) == comm.rank:
            full_grads[i] = full
    wait_all(handles)
    for i, full in full_grads.items():
        full_grads[i] = full.float()  # the SVD runs in float32 whatever travelled
        if not step.layout.averaged:  # a sum of the ranks' own gradients: their mean
            full_grads[i].div_(comm.world_size)
    bases: dict[int, Tensor] = {}
    next_steps: dict[int, Tensor] = {}
    handles = []
    for i in due:
        shape = step.proj_shape(i)
        # The next refresh step travels with the basis (lazy refresh lengthens it on the owner).
        next_step = torch.full((1,), -1.0, dtype=torch.float64, device=step.device)
        if step.owner(i) == comm.rank:
            state = step.state(i)
            basis = source.compute_basis(step.group, full_grads.pop(i).view(shape), state)
            old = step.basis(i) if "proj" in state and lazy_refresh(step.group) else None
            chosen = next_refresh_step(step.group, state, old, basis, step.side(i))
            if chosen is not None:
                next_step.fill_(chosen)
        else:
            basis_shape = projection_shape(shape, step.group["rank"], step.side(i))
            basis = torch.empty(basis_shape, dtype=torch.float32, device=step.device)
        handles.append(comm.broadcast(basis, src=step.owner(i)))
        handles.append(comm.broadcast(next_step, src=step.owner(i)))
        bases[i], next_steps[i] = basis, next_step
    wait_all(handles)
    for i, basis in bases.items():
        state = step.state(i)
        if lazy_refresh(step.group):  # one read per refresh
            keep_next_refresh(state, int(next_steps[i].item()))
        if step.fragments[i] is not None:
            store_basis(state, basis, step.group.get("proj_bits"))
        else:
            drop_basis(state)
    return due


def check_bases(step: GroupStep, indices: list[int]) -> None:
    """Every rank that projects a matrix holds its basis (a state loaded without one is not a
    state this optimizer saved)."""
    if step.random:
        return  # nothing stored: regenerated
    for i in indices:
        needs = step.holds(i) if step.owner_alone else step.fragments[i] is not None
        if needs and "proj" not in step.state(i):
            raise ValueError(
                f"{step.params[i].name}: the optimizer state has no projection basis at step "
                f"{step.state(i).get('step', 0)}, which is not a refresh step "
                f"(update_proj_gap={step.group['update_proj_gap']}): it was not saved by "
                "GradNormLoRPAdamW.state_dict(); load a state saved by this optimizer"
            )


def low_rank_gradients(
    step: GroupStep, indices: list[int], partials: dict[int, Tensor] | None = None
) -> dict[int, Tensor]:
    """The low-rank gradient of each matrix where its moments are kept (see the placements).

    ``partials``: this rank's low-rank contributions already computed (per-layer mode sums them
    over micro-batches), for ``"reduce"`` placements; else projected from the runs here."""
    comm = step.comm
    lows: dict[int, Tensor] = {}
    handles: list[Handle | None] = []
    for i in indices:
        placement, fragment = step.placement(i), step.fragments[i]
        shape, side = step.proj_shape(i), step.side(i)
        if placement == "owner":
            if step.holds(i):
                grad = step.params[i].tensor.grad
                assert grad is not None
                lows[i] = project(grad.reshape(shape), step.basis(i), side)
        elif placement == "rows":
            if fragment is not None:
                first, stop = covering_rows(fragment.start, fragment.numel, shape[1])
                grad_rows = fragment.grad[: fragment.numel].view(stop - first, shape[1])
                proj = step.basis(i)
                lows[i] = grad_rows.to(proj.dtype) @ proj.T
        elif i in step.reduced:
            if step.owner(i) == comm.rank:
                lows[i] = step.reduced[i].float()
        else:
            if partials is not None and i in partials:
                low = partials[i].to(step.device, step.wire_dtype(i)).contiguous()
            elif fragment is not None and fragment.numel == math.prod(shape):
                # The whole matrix (data parallel): project it at once, no row bookkeeping.
                proj = step.basis(i)
                grad = fragment.grad.view(shape).to(step.device, proj.dtype)
                low = project(grad, proj, side).to(step.wire_dtype(i)).contiguous()
            else:
                low = torch.zeros(
                    low_rank_shape(shape, step.group["rank"], side), device=step.device
                )
                if fragment is not None:
                    grad = fragment.grad[: fragment.numel].to(step.device)
                    proj = step.basis(i)
                    project_fragment(grad, fragment.start, fragment.numel, shape, proj, side, low)
            handles.append(comm.reduce_sum(low, dst=step.owner(i)))
            if step.owner(i) == comm.rank:
                lows[i] = low
    wait_all(handles)
    if not step.layout.averaged:  # the ranks' own gradients summed: their mean, as one process
        for i, low in lows.items():
            if step.placement(i) == "reduce":
                # Float32 moments whatever travelled (bf16 weights send bf16).
                lows[i] = low.float().div_(comm.world_size)
    return lows


def adam_directions(
    step: GroupStep, indices: list[int], lows: dict[int, Tensor]
) -> dict[int, Tensor]:
    """Count the step of every matrix in ``indices``; Adam on the low-rank gradients in ``lows``
    (where the moments are kept); returns the normalised low-rank directions ``m / (sqrt(v) +
    eps)`` (before bias correction, which :func:`apply_directions` folds into the step size)."""
    beta1, beta2 = step.group["betas"]
    for i in indices:
        if step.states[i] is not None:
            step.counted[i] = int(step.state(i).get("step", 0))
            step.state(i)["step"] = step.counted[i] + 1
    directions: dict[int, Tensor] = {}
    for i, low in lows.items():
        offset = 0
        if step.placement(i) == "rows":  # this rank's rows of the (M x r) moments
            fragment = step.fragments[i]
            assert fragment is not None
            offset = covering_rows(fragment.start, fragment.numel, step.proj_shape(i)[1])[0]
            offset *= step.group["rank"]
        low = low.contiguous()
        if step.factored:  # before the gradient's buffer takes the direction
            shape = step.params[i].shape
            projfactor.update_statistics(step.state(i), low, step.basis(i), step.group, shape)
        moments = MomentStore(
            step.state(i),
            step.group["bits"],
            param_numel=step.moments_numel(i),
            offset=offset,
            min_numel=step.group.get("min_8bit_size", MIN_8BIT_NUMEL),
            keys=FIRST_MOMENT_ONLY if step.factored else MOMENT_KEYS,
        )
        flat = low.view(-1)
        for start, stop, exp_avg, exp_avg_sq in moments.chunks(low):
            grad = flat[start:stop]
            if exp_avg_sq is None:  # ProjFactor: the direction is the first moment itself
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                grad.copy_(exp_avg)
                continue
            update_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
            # The gradient is consumed: its buffer takes the direction (no second workspace).
            grad.copy_(normalized_low_rank_update(exp_avg, exp_avg_sq, step.group["eps"]))
        if moments.shared:
            step.shared[i] = moments.shared
        directions[i] = low
    return directions


def apply_directions(step: GroupStep, indices: list[int], directions: dict[int, Tensor]) -> None:
    """Back-project each direction onto the weights this rank updates, with GaLore's step size,
    scale and decoupled weight decay (``reduce`` placements first broadcast it from the owner)."""
    comm = step.comm
    handles: list[Handle | None] = []
    packets: dict[int, Tensor] = {}
    for i in indices:
        if step.placement(i) != "reduce":
            continue
        low_shape = low_rank_shape(step.proj_shape(i), step.group["rank"], step.side(i))
        if step.factored:  # the first moment and the row/column sums, float32, in one packet
            if step.owner(i) == comm.rank:
                packet = projfactor.pack(directions[i].to(step.device), step.state(i))
            else:
                numel = projfactor.packet_numel(low_shape, step.params[i].shape)
                packet = torch.empty(numel, dtype=torch.float32, device=step.device)
            handles.append(comm.broadcast(packet, src=step.owner(i)))
            packets[i] = packet
            continue
        if step.owner(i) == comm.rank:
            directions[i] = directions[i].to(step.device, step.wire_dtype(i)).contiguous()
        else:
            directions[i] = torch.empty(low_shape, dtype=step.wire_dtype(i), device=step.device)
        handles.append(comm.broadcast(directions[i], src=step.owner(i)))
    wait_all(handles)
    statistics: dict[int, tuple[Tensor, Tensor]] = {}
    for i, packet in packets.items():
        low_shape = low_rank_shape(step.proj_shape(i), step.group["rank"], step.side(i))
        directions[i], row, col = projfactor.unpack(packet, low_shape, step.params[i].shape)
        statistics[i] = (row, col)
    beta1, beta2 = step.group["betas"]
    for i in indices:
        if not step.holds(i) or i not in directions:
            continue
        fragment = step.fragments[i]
        state, shape, side = step.state(i), step.proj_shape(i), step.side(i)
        true_shape = step.params[i].shape
        proj = step.basis(i)
        direction = directions[i].to(proj.dtype)  # 8-bit moments come back as float32
        placement = step.placement(i)
        start, numel = 0, math.prod(shape)
        if placement == "owner":
            master = step.params[i].tensor.data
            update = project_back(direction, proj, side).view(true_shape)
        elif placement == "rows":
            assert fragment is not None
            master = fragment.master[: fragment.numel]
            update = (direction @ proj).reshape(-1)
        elif fragment is not None and fragment.numel == math.prod(shape):
            master = fragment.master.view(true_shape)  # the whole matrix (data parallel)
            update = project_back(direction, proj, side).view(true_shape)
        else:
            assert fragment is not None
            master = fragment.master[: fragment.numel]
            start, numel = fragment.start, fragment.numel
            update = back_project_fragment(direction, start, numel, shape, proj, side)
        # A random basis back-projects as G P^T P / r: the 1/r rides on the step's scale.
        scale = step.group["scale"] / step.back_divisor
        if step.factored:
            stats = statistics.get(i) or (state["row_sq"], state["col_sq"])
            quotient = projfactor.divide_by_denominator(
                update.reshape(-1), start, numel, true_shape, stats, step.group, state["step"]
            )
            apply_factored_update_(
                master,
                quotient.view(master.shape).to(master.device),
                step=state["step"],
                lr=step.group["lr"],
                beta1=beta1,
                weight_decay=step.group["weight_decay"],
                scale=scale,
            )
        else:
            apply_projected_update_(
                master,
                update.to(master.device, master.dtype),
                step=state["step"],
                lr=step.group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=step.group["weight_decay"],
                scale=scale,
            )
        if fragment is not None and fragment.write_back is not None:
            fragment.write_back()


def dense_block(step: GroupStep, index: int) -> tuple[Tensor, Tensor, int] | None:
    """``(weights, gradient, offset)`` of the part of dense parameter ``index`` this rank
    updates, ``offset`` its first element in the parameter (replicated layouts: the rows it
    owns; their gradients are averaged by then, by DDP or by the optimizer's reduction to
    owners)."""
    fragment = step.fragments[index]
    if not step.layout.replicated:
        if fragment is None:
            return None
        return fragment.master[: fragment.numel], fragment.grad[: fragment.numel], fragment.start
    tensor = step.params[index].tensor
    assert tensor.grad is not None
    owned = [b for b in step.blocks[index] if b.owner == step.comm.rank]
    if not owned:
        return None
    (block,) = owned
    if block.whole:
        return tensor.data, tensor.grad, 0
    rows = slice(block.row_start, block.row_stop)
    per_row = tensor[0].numel() if tensor.dim() else 1
    return tensor.data[rows], tensor.grad[rows], block.row_start * per_row


def update_dense(step: GroupStep, index: int) -> None:
    """``torch.optim.AdamW``'s update of the part of dense parameter ``index`` this rank holds
    (8-bit or not decided by the whole parameter, as on one process)."""
    held = dense_block(step, index)
    if held is None:
        return
    weights, grad, offset = held
    state = step.state(index)
    fragment = step.fragments[index]
    if step.layout.flattened and "exp_avg" not in state:
        assert fragment is not None
        state["run"] = [fragment.start, fragment.numel]  # where these moments sit in the matrix
    shared = update_dense_block(
        state,
        step.group,
        weights,
        grad,
        param_numel=math.prod(step.params[index].shape),
        offset=offset,
    )
    if shared:
        step.shared[index] = shared
    if fragment is not None and fragment.write_back is not None:
        fragment.write_back()


def broadcast_updated(step: GroupStep, index: int) -> list[Handle | None]:
    """Replicated layouts: parameter ``index``'s blocks from their owners to every rank (a
    projected matrix under the low-rank reduction needs none: every rank applied the same
    direction to its own copy)."""
    if not step.layout.replicated or step.comm.world_size == 1:
        return []
    if step.projected and not step.layout.averaged:
        return []
    tensor = step.params[index].tensor
    handles = []
    for block in step.blocks[index]:
        rows = tensor.data if block.whole else tensor.data[block.row_start : block.row_stop]
        handles.append(step.comm.broadcast(rows, src=block.owner))
    return handles


def step_group(step: GroupStep, source: BasisSource) -> None:
    """Every phase of one param group (see the module docstring); a replicated layout's
    broadcasts are started as each parameter is updated and waited for at the end."""
    handles: list[Handle | None] = []
    indices = [i for i in range(len(step.params)) if _takes_part(step, i)]
    if step.projected:
        refreshed = set(refresh_subspaces(step, source, indices))
        check_bases(step, [i for i in indices if i not in refreshed])
        # Collectives are batched (their handles overlap); local work goes matrix by matrix, so
        # one matrix's low-rank workspace is alive at a time, not the whole group's.
        batched = [i for i in indices if step.placement(i) == "reduce"]
        if batched:
            lows = low_rank_gradients(step, batched)
            apply_directions(step, batched, adam_directions(step, batched, lows))
        for i in indices:
            if step.placement(i) != "reduce":
                lows = low_rank_gradients(step, [i])
                apply_directions(step, [i], adam_directions(step, [i], lows))
                handles.extend(broadcast_updated(step, i))
    else:
        for i in indices:
            update_dense(step, i)
            handles.extend(broadcast_updated(step, i))
    settle_shared_blocks(step, indices)
    wait_all(handles)


def settle_shared_blocks(step: GroupStep, indices: list[int]) -> None:
    """Agree the scales of the 8-bit blocks cut between ranks among ``indices`` (one small
    all-reduce, on every rank, when any of them may be cut: see :mod:`block_grid`)."""
    cut = [i for i in indices if step.cut_8bit(i)]
    if cut:
        agree_shared_blocks(step.comm, step.device, [step.shared.pop(i, []) for i in cut])
    assert not step.shared, f"unsettled 8-bit blocks of {sorted(step.shared)}"


def step_groups(steps: list[GroupStep], source: BasisSource, max_grad_norm: float) -> None:
    """Every group of one ``step()``. ``max_grad_norm > 0`` clips what the optimizer consumes
    (every projected matrix's low-rank gradient and every dense gradient, as averaged over the
    ranks) to that global L2 norm: computed from the reduced tensors on the ranks that hold them
    (one scalar all-reduce, on the device), so one process and any number of ranks, compressed
    or not, clip the same tensors by the same coefficient. It needs every group's low-rank
    gradient before any update, so they are all alive at once (low-rank workspace only)."""
    if max_grad_norm <= 0.0:
        for step in steps:
            step_group(step, source)
        return
    handles: list[Handle | None] = []
    prepared: list[tuple[GroupStep, list[int], dict[int, Tensor]]] = []
    for step in steps:
        indices = [i for i in range(len(step.params)) if _takes_part(step, i)]
        lows: dict[int, Tensor] = {}
        if step.projected:
            refreshed = set(refresh_subspaces(step, source, indices))
            check_bases(step, [i for i in indices if i not in refreshed])
            lows = low_rank_gradients(step, indices)
        prepared.append((step, indices, lows))
    consumed = [low for _step, _indices, lows in prepared for low in lows.values()]
    for step, indices, _lows in prepared:
        if not step.projected:
            consumed += [held[1] for i in indices if (held := dense_block(step, i)) is not None]
    coefficient = clip_coefficient(steps[0].comm, consumed, max_grad_norm, steps[0].device)
    for tensor in consumed:
        tensor.mul_(coefficient.to(tensor.device, tensor.dtype))
    for step, indices, lows in prepared:
        if step.projected:
            apply_directions(step, indices, adam_directions(step, indices, lows))
        for i in indices:
            if not step.projected:
                update_dense(step, i)
            handles.extend(broadcast_updated(step, i))
        settle_shared_blocks(step, indices)
    wait_all(handles)


def _takes_part(step: GroupStep, index: int) -> bool:
    """Parameters with a gradient (the same on every rank). Sharded layouts: a rank without a
    run of such a parameter still joins the collectives of its matrix."""
    return step.active[index]
