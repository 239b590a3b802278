"""GradNormLoRPAdamW: AdamW whose states live in a low-rank gradient subspace.

The class holds state and loops over parameters; the math is in :mod:`gnlorp_dist.optim.projection`
and :mod:`gnlorp_dist.optim.functional`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim import state_dict as state_io
from gnlorp_dist.optim.backward_reduction import BackwardReduction
from gnlorp_dist.optim.comm import (
    Communicator,
    buffer_device,
    default_communicator,
    wait_all,
)
from gnlorp_dist.optim.data_parallel import check_replicated_gradients, reduce_to_owners
from gnlorp_dist.optim.driver import step_groups
from gnlorp_dist.optim.fragment_state import LAYOUT_KEY, STATE_PREFIX, adopt_loaded_state
from gnlorp_dist.optim.fragments import ModelParameter
from gnlorp_dist.optim.group_step import GroupStep
from gnlorp_dist.optim.layouts import LOW_RANK_REDUCED, REPLICATED, Layout, detect_layout
from gnlorp_dist.optim.nonfinite_guard import NonFiniteGuard
from gnlorp_dist.optim.ownership import OwnedBlock, plan_ownership
from gnlorp_dist.optim.per_layer_step import PerLayerStep
from gnlorp_dist.optim.projection import compute_projection, projection_side, resolve_svd_method
from gnlorp_dist.optim.projector import is_random, planning_proj_type, projected_shape
from gnlorp_dist.optim.quantized import MIN_8BIT_NUMEL
from gnlorp_dist.optim.validation import (
    check_finite_hyperparameters,
    check_gradient_reduction,
    check_max_grad_norm,
    check_min_8bit_size,
    missing_communicator_error,
    validate_projected_group,
    warn_if_nothing_is_projected,
)


class GradNormLoRPAdamW(
    PerLayerStep, NonFiniteGuard, state_io.StateDictMethods, torch.optim.Optimizer
):
    """AdamW with GaLore-style low-rank projection of 2-D gradients.

    A drop-in for ``galore_torch.GaLoreAdamW``: parameter groups that carry ``rank`` (with
    ``update_proj_gap``, ``scale`` and ``proj_type``) are projected; groups without ``rank`` are
    plain ``torch.optim.AdamW``. GradNormLoRP is this optimizer applied to a model whose linear
    layers were weight-normalized by :func:`gnlorp_dist.apply_weight_norm`: the directions ``V``
    (or LoRA factors) sit in projected groups, the magnitudes in the dense group.

    Projected update of a matrix ``W`` with gradient ``G`` at per-parameter step ``t`` (counted
    before the increment):

    1. refresh: if ``t % update_proj_gap == 0``, ``P`` = top-``rank`` singular vectors of ``G``
       (float32 SVD), on the side the ``proj_type`` rule picks;
    2. project: ``R = G P^T`` (right) or ``P^T G`` (left);
    3. Adam on ``R`` (moments keep ``R``'s shape and survive refreshes);
    4. ``W -= lr * scale * back(m_hat / (sqrt(v_hat) + eps))`` then ``W -= lr * wd * W``.

    One class for one process or many, and for every engine: ``step()`` runs the phases of
    :mod:`gnlorp_dist.optim.driver` (collect, verify, refresh due subspaces on their owners,
    project, Adam where the moments are kept, back-project, write back or broadcast) over each
    group's layout (:mod:`gnlorp_dist.optim.layouts`):

    - one process, or DDP (a ``communicator`` over ``N`` ranks whose gradients are averaged):
      the state is sharded by the ownership plan (:mod:`gnlorp_dist.optim.ownership`): each
      projected matrix owned whole by one rank (its SVD, moments and update), big dense tensors
      in row blocks; owners broadcast what they updated, so every rank holds bitwise identical
      weights. With ``reduce_gradients=True`` (a model NOT wrapped in DDP) each block's gradient
      is first reduced to its owner and averaged there: reduce plus broadcast move what one
      all-reduce does;
    - DeepSpeed ZeRO 1/2/3: the engine hands flat partitions; each rank projects its runs of
      each matrix and the partial low-rank sums go to the owner, which alone keeps the moments
      and computes the SVD and broadcasts the low-rank direction;
    - FSDP2 (``fully_shard``; ``import gnlorp_dist`` registers the layout): each rank holds a
      block of rows; right-projected matrices update their rows with no communication between
      refreshes (moments sharded with the rows), left-projected ones reduce their ``r x n``
      partial sums to the owner.

    The SVD of a due subspace runs once in the job, on the matrix's owner; its whole gradient is
    assembled there only at a refresh. Without a ``communicator`` the job's default is used:
    one process, or the ``torch.distributed`` group once the launcher or engine created it.

    ``bits=8`` keeps Adam's moments block-wise 8-bit quantised (see
    :mod:`gnlorp_dist.optim.quantized`; the update math is unchanged, it reads and writes the
    moments chunk by chunk through a :class:`MomentStore`, so no whole float32 moment ever
    exists) for tensors of at least ``min_8bit_size`` elements (bitsandbytes' name and default,
    4096). Every layout keeps them on the whole tensor's block grid, so sharded 8-bit runs hold
    one process's codes. A group may override ``bits`` and ``min_8bit_size``.

    ``state_dict()`` is the whole job's state on any number of ranks (see :meth:`state_dict`
    and :mod:`gnlorp_dist.optim.state_dict`; under FSDP2 the DTensor-sharded state that
    ``torch.distributed.checkpoint`` saves and reshards); tensors and Python numbers only, so
    ``torch.load(weights_only=True)`` reads it; loading it into a fresh optimizer on any number
    of ranks continues the run exactly (state tensors keep their saved dtypes: codes stay uint8,
    block scales float32). For states too large to gather on one rank,
    :func:`gnlorp_dist.distributed.save_sharded_optimizer` writes one file per rank instead.

    Devices: every tensor the optimizer allocates is on its parameter's device, and every tensor
    it hands to a collective on the communicator's ``device`` (NCCL: this rank's GPU); nothing is
    built on the default device. A loaded state lands on each parameter's device.

    Non-finite gradients (``on_nonfinite``): every ``step()`` first checks every gradient it
    is about to consume in one fused count and one verdict summed over ranks
    (:mod:`gnlorp_dist.optim.nonfinite_guard`), before anything changes. ``"raise"`` (the API
    default): a ValueError naming the parameters, on every rank. ``"skip"`` (``gnlorp-train``'s
    default): ``step()`` changes nothing, on every rank; :attr:`skipped_steps` (not saved in
    ``state_dict()``) counts such steps and :attr:`last_step_skipped` flags the latest one.
    Per-layer mode can only raise, and only once the step's last backward pass is over, after
    it has updated every parameter with non-finite entries taken as zero (see
    :meth:`step_parameter`); under ZeRO the engine calls ``step()`` per group, so the verdict
    covers that call's groups. A caller that knows the gradients are finite (a finite
    ``clip_grad_norm_``) calls :meth:`mark_gradients_finite`.

    Synchronisation with the host: updates never wait for the device (step counters are Python
    numbers, clipping stays on the device, VLoRP's random bases are drawn on the device); the
    host reads the non-finite verdict (a count made on the device) once per step, and nothing
    else on a step that refreshes no subspace (``tests/unit/test_host_syncs.py`` counts them):

    - ``step()``, one process: one ``.item()`` (none after :meth:`mark_gradients_finite`);
    - ``step()``, several ranks (DDP, owners, low-rank reduction) and FSDP2: one 5-element
      all-reduce and one host read (it also carries the gradient checksums: every gradient's
      first row, on every rank);
    - ZeRO: the same per ``step()`` call, and the engine calls it once per param group;
    - per-layer mode: one scalar all-reduce and one ``.item()`` per step, when the backward
      pass that ends it is over (:meth:`finish_per_layer_step`), whatever the number of
      matrices and micro-batches;
    - refresh steps add the SVD's own sync per refreshed matrix (``torch.linalg.svd`` checks
      its result on the host) and, under lazy refresh, one read per refreshed matrix on its
      owner (the subspace overlap, right after that SVD) plus, where the basis is broadcast,
      one read of the next refresh steps (per group; per matrix in per-layer mode).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bits: int = 32,
        communicator: Communicator | None = None,
        reduce_gradients: bool = False,
        on_nonfinite: str = "raise",
        gradient_reduction: str | None = None,
        max_grad_norm: float = 0.0,
        min_8bit_size: int = MIN_8BIT_NUMEL,
    ) -> None:
        # None: the job's default (one process, or the torch.distributed group once an engine
        # such as deepspeed.initialize has created it), resolved at the latest at the first step.
        self._comm = communicator if communicator is not None else default_communicator()
        self.gradient_reduction = check_gradient_reduction(gradient_reduction, reduce_gradients)
        """``"none"``: gradients arrive averaged (DDP, engines); ``"full"``: each block's full
        gradient is reduced to its owner; ``"low_rank"``: projected matrices' low-rank
        gradients are reduced (dense blocks in full)."""
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        """> 0: clip what the optimizer consumes to this global norm (see
        :func:`gnlorp_dist.optim.driver.step_groups`)."""
        check_finite_hyperparameters(
            "", lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay
        )
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"lr={lr!r} must be a number >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"eps={eps!r} must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        check_min_8bit_size(min_8bit_size, "")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bits": bits,
            "min_8bit_size": min_8bit_size,
        }
        self._per_layer: Any = None
        self._per_layer_tally = None  # per-layer mode's device-side non-finite verdict
        self._backward_reduction: BackwardReduction | None = None
        self._loaded_engine_state: dict[str, dict[str, Any]] | None = None
        super().__init__(params, defaults)
        self.refresh_count = 0
        """Subspaces this rank has computed (each refresh happens on one rank only)."""
        self._consolidated: dict[str, Any] | None = None
        self._groups_checked = False
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        """Steps skipped for a non-finite gradient (``on_nonfinite="skip"``) since construction
        (a plain attribute: not saved in ``state_dict()``)."""
        self.last_step_skipped = False
        """Whether the latest ``step()`` was skipped for a non-finite gradient."""
        self._gradients_known_finite = False
        self._check_non_finite = True  # private: benchmarks/nonfinite_check.py's baseline

    @property
    def comm(self) -> Communicator:
        """The ranks this optimizer shards its state over (see :mod:`gnlorp_dist.optim.comm`)."""
        if self._comm is None:
            self._comm = default_communicator()
            if self._comm is None:
                raise missing_communicator_error(os.environ.get("WORLD_SIZE"))
        return self._comm

    # -- construction-time validation ------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._lookup: dict[Tensor, tuple[dict[str, Any], str]] | None = None
        self._blocks: list[list[OwnedBlock]] | None = None
        self._ownership_cache: tuple[tuple[int, ...], dict[Tensor, list[OwnedBlock]]] | None = None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # Engines that flatten parameters (DeepSpeed ZeRO) replace group["params"]; the model's
        # own tensors, their shapes now and the group dicts map their flat runs back to matrices.
        if not hasattr(self, "model_params"):
            self.model_params: list[list[Tensor]] = []
            self.true_shapes: list[list[tuple[int, ...]]] = []
            self.groups_at_construction: list[dict[str, Any]] = []
        params = list(group["params"])
        # Refuses here, before any step, a layout an engine integration knows it cannot run.
        layout = detect_layout(params, params)
        layout.check_group(group, len(self.param_groups) - 1)
        self.model_params.append(params)
        self.true_shapes.append([layout.true_shape(p) for p in params])
        self.groups_at_construction.append(group)
        if group["bits"] not in (8, 32):
            raise ValueError(f"bits={group['bits']!r} is not supported; use 32 or 8")
        check_min_8bit_size(group["min_8bit_size"], f"param_groups[{len(self.param_groups) - 1}]: ")
        if "rank" in group:
            validate_projected_group(group, len(self.param_groups) - 1)
        where = f"param_groups[{len(self.param_groups) - 1}]: "
        check_finite_hyperparameters(
            where, **{k: group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in group}
        )

    # -- the step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self._per_layer is not None:
            raise ValueError(
                "optimizer.step() called while per-layer updates are attached: the backward pass "
                "already updated every parameter. Drop optimizer.step() (and zero_grad()) from the "
                "loop, or call per_layer.remove() first."
            )
        self._consolidated = None
        if not self._groups_checked:
            self._groups_checked = warn_if_nothing_is_projected(self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        known_finite, self._gradients_known_finite = self._gradients_known_finite, False
        self.last_step_skipped = False
        steps = self.group_steps()
        if self.gradient_reduction != "none":
            self._reduce_gradients_to_owners(steps)
        if not self._verify_gradients(steps, known_finite):
            if self._backward_reduction is not None:
                self._backward_reduction.drain()
            self._skip_step()
            return loss
        step_groups(steps, self, self.max_grad_norm)
        return loss

    def reducing_in_backward(self) -> contextlib.AbstractContextManager[None]:
        """Wrap the last micro-batch's backward pass in this: under the low-rank reduction each
        parameter's reduction then starts as soon as its gradient is final, overlapping the rest
        of backward (:mod:`gnlorp_dist.optim.backward_reduction`); ``step()`` waits for them.
        Elsewhere (one process, DDP, engines, per-layer mode) it does nothing."""
        if (
            self.gradient_reduction != "low_rank"
            or self.comm.world_size == 1
            or self._per_layer is not None
        ):
            return contextlib.nullcontext()
        if self._backward_reduction is None:
            self._backward_reduction = BackwardReduction(self)
        return self._backward_reduction.armed()

    @property
    def reduce_gradients(self) -> bool:
        """Whether the optimizer reduces the gradients itself (the model is not in DDP)."""
        return self.gradient_reduction != "none"

    def group_steps(self) -> list[GroupStep]:
        """One :class:`GroupStep` per param group an engine is stepping now (all of them,
        outside engines), each with its layout, this rank's runs and states."""
        steps = []
        comm = self.comm
        for group in self.param_groups:
            engine_params = list(group["params"])
            if not engine_params:
                continue  # engines that step one group at a time empty the others
            index = self._construction_index(group)
            layout = detect_layout(self.model_params[index], engine_params)
            if (
                layout is REPLICATED
                and self.gradient_reduction == "low_rank"
                and comm.world_size > 1
            ):
                layout = LOW_RANK_REDUCED
            params = self._model_parameters(index, None if layout.flattened else engine_params)
            if layout.replicated:
                check_replicated_gradients(group, params)
            fragments = layout.fragments(params, engine_params, comm.rank, comm.world_size)
            active = [layout.has_gradient(p.tensor) for p in params]
            blocks = [self._plan()[self._position(index, i)] for i in range(len(params))]
            if layout.flattened:
                self.state[LAYOUT_KEY] = {"engine": layout.name, "world_size": comm.world_size}
            states: list[dict[str, Any] | None] = []
            for i, (param, param_blocks) in enumerate(zip(params, blocks)):
                if layout.replicated and (layout.averaged or "rank" not in group):
                    keeps = any(b.owner == comm.rank for b in param_blocks)  # owner's only
                else:  # a projected matrix's step counter (and basis) lives on every rank
                    keeps = "rank" in group or fragments[i] is not None
                keeps = keeps and active[i]
                states.append(self.state[self._state_key(layout, param)] if keeps else None)
            held = [f.grad.device for f in fragments if f is not None]
            like = held[0] if held else params[0].tensor.device
            group_step = GroupStep(
                group=self.groups_at_construction[index],
                layout=layout,
                params=params,
                fragments=fragments,
                states=states,
                active=active,
                blocks=blocks,
                comm=comm,
                device=buffer_device(comm, like),
            )
            if self._loaded_engine_state:
                adopt_loaded_state(group_step, self._loaded_engine_state)
            if self._backward_reduction is not None and layout is LOW_RANK_REDUCED:
                for i, param in enumerate(params):
                    low = self._backward_reduction.take_low_rank(param.tensor)
                    if low is not None:
                        group_step.reduced[i] = low
            steps.append(group_step)
        return steps

    def _construction_index(self, group: dict[str, Any]) -> int:
        for index, candidate in enumerate(self.groups_at_construction):
            if candidate is group:
                return index
        raise ValueError(
            "a param group reached GradNormLoRPAdamW.step() that this optimizer did not "
            "build (an engine replaced the group dicts); add every group before "
            "deepspeed.initialize and load state with optimizer.load_state_dict"
        )

    def _model_parameters(
        self, group_index: int, stepped: list[Tensor] | None = None
    ) -> list[ModelParameter]:
        """The group's parameters with their true shapes and names; their tensors are the ones
        ``step()`` updates (``stepped``: an engine's same-shaped copies, as ZeRO-0 steps fp32
        copies), else the model's own."""
        group = self.groups_at_construction[group_index]
        names = group.get("param_names")
        tensors = stepped if stepped is not None else self.model_params[group_index]
        return [
            ModelParameter(
                tensor=param,
                shape=self.true_shapes[group_index][i],
                name=names[i] if names else f"param_groups[{group_index}][{i}]",
            )
            for i, param in enumerate(tensors)
        ]

    def _state_key(self, layout: Layout, param: ModelParameter) -> Any:
        """THE state keying: a parameter's own tensor, or its name where an engine replaced the
        group's tensors (torch's ``state_dict()`` can only index the tensors it steps)."""
        return STATE_PREFIX + param.name if layout.flattened else param.tensor

    def load_engine_state(self, merged: dict[str, dict[str, Any]]) -> None:
        """State of flattened groups read from an engine checkpoint saved on any number of ranks
        (:func:`gnlorp_dist.optim.fragment_state.merge_flattened_states`), adopted by this
        rank's runs and ownership at the first step."""
        self._loaded_engine_state = merged

    def _plan(self) -> list[list[OwnedBlock]]:
        """THE ownership plan (one per optimizer, cached): the blocks of every parameter, by its
        position over all groups, from the true shapes recorded at construction."""
        if self._blocks is None:
            shapes, ranks, proj_types = [], [], []
            for index, group in enumerate(self.groups_at_construction):
                for shape in self.true_shapes[index]:
                    # A projected matrix is owned whole: sized by its projected state.
                    projected = "rank" in group and len(shape) == 2
                    shapes.append(projected_shape(shape, group) if projected else shape)
                    ranks.append(group.get("rank"))
                    proj_types.append(planning_proj_type(group))
            plan = plan_ownership(shapes, ranks, proj_types, self.comm.world_size)
            self._blocks = [[] for _ in shapes]
            for block in plan:
                self._blocks[block.param_index].append(block)
        return self._blocks

    def _position(self, group_index: int, index: int) -> int:
        return sum(len(p) for p in self.model_params[:group_index]) + index

    def ownership(self) -> dict[Tensor, list[OwnedBlock]]:
        """The ownership plan: for each parameter, its blocks and their owners (cached: hooks
        ask per parameter; rebuilt when an engine swaps a group's parameter list)."""
        lists = tuple(id(group["params"]) for group in self.groups_at_construction)
        if self._ownership_cache is None or self._ownership_cache[0] != lists:
            params = []
            for index, group in enumerate(self.groups_at_construction):
                stepped = list(group["params"])  # an engine's same-shaped copies (ZeRO-0)
                same = len(stepped) == len(self.model_params[index])
                params += stepped if same else self.model_params[index]
            self._ownership_cache = (lists, dict(zip(params, self._plan(), strict=True)))
        return self._ownership_cache[1]

    def owns(self, param: Tensor) -> bool:
        """Whether this rank holds (part of) ``param``'s optimizer state."""
        return any(b.owner == self.comm.rank for b in self.ownership()[param])

    def replica_state(self, param: Tensor, owner_state: dict[str, Any]) -> dict[str, Any] | None:
        """What a rank that does not own ``param`` keeps of its owner's state: under the
        low-rank reduction every rank projects with the basis and counts the steps of every
        projected matrix (``{"step", "proj"}``); otherwise nothing (None)."""
        group, _name = self.group_and_name(param)
        if self.gradient_reduction != "low_rank" or self.comm.world_size == 1:
            return None
        if "rank" not in group:
            return None
        if is_random(group):  # nothing stored: the step count alone regenerates the basis
            return {"step": owner_state["step"]} if "step" in owner_state else None
        if "proj" not in owner_state:
            return None
        kept = ("step", "proj", "proj_scale", "next_refresh")
        return {key: owner_state[key] for key in kept if key in owner_state}

    def owned_block(self, param: Tensor) -> OwnedBlock:
        """The block of ``param`` this rank owns (it must own one)."""
        (block,) = [b for b in self.ownership()[param] if b.owner == self.comm.rank]
        return block

    def _reduce_gradients_to_owners(self, steps: list[GroupStep]) -> None:
        """Replicated layouts without DDP: each block's gradient summed on its owner, then
        averaged there, instead of DDP's all-reduce to every rank."""
        if self.comm.world_size == 1:
            return
        handles, owned = [], []
        for group_step in steps:
            if not group_step.layout.replicated:
                continue
            if group_step.projected and not group_step.layout.averaged:
                continue  # low-rank reduction: only the projected gradients travel, in the step
            for i, param in enumerate(group_step.params):
                if not group_step.active[i]:
                    continue
                started = None
                if self._backward_reduction is not None:
                    started = self._backward_reduction.take_dense(param.tensor)
                if started is not None:  # its reduce started inside backward
                    owned += started
                else:
                    owned += reduce_to_owners(
                        self.comm, param.tensor, group_step.blocks[i], handles
                    )
        wait_all(handles)
        for rows in owned:
            rows.div_(self.comm.world_size)

    def compute_basis(
        self, group: dict[str, Any], grad_MN: Tensor, state: dict[str, Any]
    ) -> Tensor:
        """A new subspace basis from a whole 2-D gradient (counted in ``refresh_count``)."""
        side = projection_side(grad_MN.shape, group["proj_type"])
        method = resolve_svd_method(group.get("svd_method", "auto"), grad_MN.shape)
        generator = None
        if method == "randomized":
            generator = torch.Generator(device=grad_MN.device)
            generator.manual_seed(int(state.get("step", 0)))
        self.refresh_count += 1
        return compute_projection(
            grad_MN,
            group["rank"],
            side,
            method=method,
            generator=generator,
        )

    def group_and_name(self, param: Tensor) -> tuple[dict[str, Any], str]:
        """``param``'s group and its name (from ``param_names``, else its position)."""
        if self._lookup is None:
            self._lookup = {}
            for group_index, group in enumerate(self.param_groups):
                names = group.get("param_names")
                for index, candidate in enumerate(group["params"]):
                    name = names[index] if names else f"param_groups[{group_index}][{index}]"
                    self._lookup[candidate] = (group, name)
        if param not in self._lookup:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not in this optimizer")
        return self._lookup[param]


class GradNormLoRPAdamW8bit(GradNormLoRPAdamW):
    """``GradNormLoRPAdamW(..., bits=8)``: block-wise 8-bit Adam moments."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> None:
        if "bits" in kwargs:
            raise ValueError(f"GradNormLoRPAdamW8bit takes no bits= (got {kwargs['bits']!r})")
        super().__init__(params, bits=8, **kwargs)
