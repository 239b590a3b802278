"""GradNormLoRPAdamW: AdamW whose states live in a low-rank gradient subspace.

The class holds state and loops over parameters; the math is in :mod:`gnlorp_dist.projection`
and :mod:`gnlorp_dist.optim.functional`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.nn.surgery import was_merged_away
from gnlorp_dist.optim import state_dict as state_io
from gnlorp_dist.optim.comm import (
    Communicator,
    default_communicator,
    wait_all,
)
from gnlorp_dist.optim.dense import update_dense_block
from gnlorp_dist.optim.fragment_step import (
    find_flattened_groups,
    flattened_gradients_finite,
    step_flattened_group,
)
from gnlorp_dist.optim.functional import projected_adamw_step
from gnlorp_dist.optim.nonfinite_guard import NonFiniteGuard
from gnlorp_dist.optim.ownership import OwnedBlock, plan_ownership
from gnlorp_dist.optim.per_layer_step import PerLayerStep
from gnlorp_dist.optim.quantized import MomentStore
from gnlorp_dist.optim.validation import (
    check_finite_hyperparameters,
    flat_gradient_error,
    merged_away_error,
    missing_communicator_error,
    validate_projected_group,
    warn_if_nothing_is_projected,
)
from gnlorp_dist.projection import (
    compute_projection,
    low_rank_shape,
    project,
    projection_side,
)


class GradNormLoRPAdamW(PerLayerStep, NonFiniteGuard, torch.optim.Optimizer):
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

    One class for one process or many. With a ``communicator`` (see
    :class:`gnlorp_dist.distributed.ProcessGroupCommunicator`) over ``N`` ranks whose gradients
    are already averaged (DDP), the optimizer state is sharded: each projected matrix is owned
    whole by one rank, big dense tensors are split in row blocks, one per rank
    (:mod:`gnlorp_dist.optim.ownership`). ``step()`` runs in phases:

    1. collect the parameters that have gradients, and check their layout;
    2. refresh, on its owner only, every subspace that is due (the SVD is computed once in the
       whole job), after checking every due gradient is finite; the verdict is summed over
       ranks (one small all-reduce) so all ranks raise together, before any weight or
       projector changes; with DDP-averaged gradients it also carries a checksum of every
       gradient's first row, and ranks whose gradients differ (not averaged) raise together;
    3. update the blocks this rank owns (projected or dense);
    4. broadcast every updated block from its owner, asynchronously as soon as it is updated
       (overlapping the updates still to come), then wait: all ranks hold bitwise identical
       weights.

    With ``reduce_gradients=True`` (a model NOT wrapped in DDP) phase 1 also reduces each block's
    gradient to its owner and averages it there, instead of DDP's all-reduce to every rank: a
    reduce plus a broadcast move the same bytes as one all-reduce, so sharded GradNormLoRP then
    communicates what DDP + AdamW does.

    On one process the communicator is a :class:`LocalCommunicator`: phases 2 and 4 skip their
    communication and the code path is otherwise the same. Without a ``communicator`` the job's
    default is used: one process, or the ``torch.distributed`` group once the launcher or engine
    created it.

    Under DeepSpeed ZeRO 1/2/3 the engine hands this optimizer flat partitions instead of its
    matrices; ``step()`` then recognises the engine's layout and runs the same math on this
    rank's runs of each matrix (:mod:`gnlorp_dist.optim.fragment_step`): low-rank partial sums go
    to the matrix's owner, which alone holds its moments and computes its SVD.

    ``bits=8`` keeps Adam's moments block-wise 8-bit quantised (see
    :mod:`gnlorp_dist.optim.quantized`; the update math is unchanged, it reads and writes the
    moments through a :class:`MomentStore`). A group may override ``bits``.

    ``state_dict()`` is the whole job's state on any number of ranks (see :meth:`state_dict`
    and :mod:`gnlorp_dist.optim.state_dict`); tensors and Python numbers only, so
    ``torch.load(weights_only=True)`` reads it; loading it into a fresh optimizer on any number
    of ranks continues the run exactly (state tensors keep their saved dtypes: codes stay uint8,
    block scales float32). For states too large to gather on one rank,
    :func:`gnlorp_dist.distributed.save_sharded_optimizer` writes one file per rank instead.

    Devices: every tensor the optimizer allocates is on its parameter's device, and every tensor
    it hands to a collective on the communicator's ``device`` (NCCL: this rank's GPU); nothing is
    built on the default device. A loaded state lands on each parameter's device.

    Non-finite gradients (``on_nonfinite``): every ``step()`` first checks every gradient it
    is about to consume (this rank's owned blocks; one fused reduction,
    :func:`gnlorp_dist.optim.comm.non_finite_count`, and one scalar verdict summed over ranks),
    before any weight, moment, projector or step counter changes. ``"raise"`` (the default for
    API users, who see the failure where it happens): a ValueError naming the parameters, on
    every rank. ``"skip"`` (``gnlorp-train``'s default): ``step()`` returns having changed
    nothing, on every rank together; :attr:`skipped_steps` counts such steps and
    :attr:`last_step_skipped` says whether the latest ``step()`` was one. ``skipped_steps`` is a
    plain attribute, not part of ``state_dict()`` (a resumed run counts from 0). Per-layer mode
    can only raise (each parameter updates inside backward, so skipping one would leave the
    others updated: see :meth:`step_parameter`). Under DeepSpeed ZeRO the engine calls
    ``step()`` once per param group: the verdict covers the group(s) of that call.
    A caller that already knows the gradients are finite (a finite total norm from
    ``clip_grad_norm_``) calls :meth:`mark_gradients_finite` so one process does not check twice.

    Synchronisation with the host: updates never wait for the device (step counters are Python
    numbers, clipping stays on the device); the host reads only the non-finite verdict (a count
    made on the device), which must be known before anything changes:

    - ``step()``, one process: one ``.item()`` every step (none after
      :meth:`mark_gradients_finite`);
    - ``step()``, several ranks: one 5-element all-reduce and one host read every step (it
      also carries the gradient checksums: every gradient's first row, on every rank);
    - ZeRO (flattened groups): one scalar all-reduce and ``.item()`` per ``step()`` call (the
      engine calls it per group), plus one per projected group at a refresh step;
    - per-layer mode: one scalar verdict (an all-reduce over several ranks) and ``.item()`` per
      projected matrix per micro-batch and per dense parameter per step.
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
    ) -> None:
        # None: the job's default (one process, or the torch.distributed group once an engine
        # such as deepspeed.initialize has created it), resolved at the latest at the first step.
        self._comm = communicator if communicator is not None else default_communicator()
        self.reduce_gradients = reduce_gradients
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
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bits": bits,
        }
        super().__init__(params, defaults)
        self.per_layer: Any = None
        """The attached :class:`PerLayerUpdates`, if any (then ``step()`` is refused)."""
        self.refresh_count = 0
        """Subspaces this rank has computed (each refresh happens on one rank only)."""
        self.flattened_plan: dict[str, int] | None = None
        """Owner rank of each projected matrix by name, when an engine flattened them."""
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
        self._blocks: dict[Tensor, list[OwnedBlock]] | None = None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # Engines that flatten parameters (DeepSpeed ZeRO) replace group["params"]; the model's
        # own tensors and the group dicts are what maps their flat runs back to matrices.
        if not hasattr(self, "model_params"):
            self.model_params: list[list[Tensor]] = []
            self.groups_at_construction: list[dict[str, Any]] = []
        self.model_params.append(list(group["params"]))
        self.groups_at_construction.append(group)
        if group["bits"] not in (8, 32):
            raise ValueError(f"bits={group['bits']!r} is not supported; use 32 or 8")
        if "rank" in group:
            validate_projected_group(group, len(self.param_groups) - 1)
        where = f"param_groups[{len(self.param_groups) - 1}]: "
        check_finite_hyperparameters(
            where, **{k: group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in group}
        )

    # -- the step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self.per_layer is not None:
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
        flattened = find_flattened_groups(self)
        if flattened:
            if self._check_non_finite and not flattened_gradients_finite(self, flattened):
                self._skip_step()
                return loss
            for group_index, layout, engine_params in flattened:
                step_flattened_group(self, group_index, layout, engine_params)
            return loss
        work = self._collect()
        if self.reduce_gradients:
            self._reduce_gradients_to_owners(work)
        if not self._verify_gradients(work, known_finite):
            self._skip_step()
            return loss
        self._refresh_subspaces(work)
        handles = []
        for group, param, _name in work:
            if self.owns(param):
                if "rank" in group:
                    self._update_projected(group, param)
                else:
                    self._update_dense(group, param, self.owned_block(param))
            # Sent while the next parameters update: communication overlaps computation.
            handles.extend(self._broadcast_blocks(param))
        wait_all(handles)
        return loss

    def ownership(self) -> dict[Tensor, list[OwnedBlock]]:
        """The ownership plan: for each parameter, its blocks and their owners."""
        if self._blocks is None:
            params, ranks, proj_types = [], [], []
            for group in self.param_groups:
                for param in group["params"]:
                    params.append(param)
                    ranks.append(group.get("rank"))
                    proj_types.append(group.get("proj_type"))
            plan = plan_ownership(
                [tuple(p.shape) for p in params], ranks, proj_types, self.comm.world_size
            )
            self._blocks = {param: [] for param in params}
            for block in plan:
                self._blocks[params[block.param_index]].append(block)
        return self._blocks

    def owns(self, param: Tensor) -> bool:
        """Whether this rank holds (part of) ``param``'s optimizer state."""
        return any(b.owner == self.comm.rank for b in self.ownership()[param])

    def owned_block(self, param: Tensor) -> OwnedBlock:
        """The block of ``param`` this rank owns (it must own one)."""
        (block,) = [b for b in self.ownership()[param] if b.owner == self.comm.rank]
        return block

    def _reduce_gradients_to_owners(self, work: list[tuple[dict[str, Any], Tensor, str]]) -> None:
        """Phase 1b: each block's gradient summed on its owner, then averaged there."""
        if self.comm.world_size == 1:
            return
        handles, owned = [], []
        for _group, param, _name in work:
            for block in self.ownership()[param]:
                rows = param.grad if block.whole else param.grad[block.row_start : block.row_stop]
                handles.append(self.comm.reduce_sum(rows, dst=block.owner))
                if block.owner == self.comm.rank:
                    owned.append(rows)
        wait_all(handles)
        for rows in owned:
            rows.div_(self.comm.world_size)

    def _broadcast_blocks(self, param: Tensor) -> list[Any]:
        """Phase 4 for one parameter: each of its blocks from its owner to every rank."""
        if self.comm.world_size == 1:
            return []
        handles = []
        for block in self.ownership()[param]:
            rows = param.data if block.whole else param.data[block.row_start : block.row_stop]
            handles.append(self.comm.broadcast(rows, src=block.owner))
        return handles

    def _collect(self) -> list[tuple[dict[str, Any], Tensor, str]]:
        """Phase 1: (group, param, name) for every parameter that has a gradient."""
        work = []
        for group_index, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for index, param in enumerate(group["params"]):
                name = names[index] if names else f"param_groups[{group_index}][{index}]"
                if was_merged_away(param):
                    raise merged_away_error(name)
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError("GradNormLoRPAdamW does not support sparse gradients")
                if "rank" in group and param.grad.dim() != 2:
                    raise flat_gradient_error(name, param.grad)
                work.append((group, param, name))
        return work

    def _refresh_subspaces(self, work: list[tuple[dict[str, Any], Tensor, str]]) -> None:
        """Phase 2: new projection matrices for the owned parameters whose refresh is due (their
        gradients were verified by :meth:`_verify_gradients`)."""
        for group, param, _name in work:
            if "rank" in group and self.owns(param) and self._refresh_due(group, param):
                self._refresh(group, param)

    def _refresh(self, group: dict[str, Any], param: Tensor) -> None:
        state = self.state[param]
        state["proj"] = self.compute_basis(group, param.grad, state)

    def compute_basis(
        self, group: dict[str, Any], grad_MN: Tensor, state: dict[str, Any]
    ) -> Tensor:
        """A new subspace basis from a whole 2-D gradient (counted in ``refresh_count``)."""
        side = projection_side(grad_MN.shape, group["proj_type"])
        generator = None
        if group.get("svd_method", "svd") == "randomized":
            generator = torch.Generator(device=grad_MN.device)
            generator.manual_seed(int(state.get("step", 0)))
        self.refresh_count += 1
        return compute_projection(
            grad_MN,
            group["rank"],
            side,
            method=group.get("svd_method", "svd"),
            generator=generator,
        )

    def _refresh_due(self, group: dict[str, Any], param: Tensor) -> bool:
        state = self.state[param]
        return "proj" not in state or state.get("step", 0) % group["update_proj_gap"] == 0

    def _update_projected(
        self, group: dict[str, Any], param: Tensor, low_rank_grad: Tensor | None = None
    ) -> None:
        state = self.state[param]
        side = projection_side(param.shape, group["proj_type"])
        if low_rank_grad is None:
            low_rank_grad = project(param.grad, state["proj"], side)
        moments = MomentStore(state, group["bits"])
        if "exp_avg" not in state:
            state["step"] = state.get("step", 0)
            moments.initialise(low_rank_grad)
        assert state["exp_avg"].shape == low_rank_shape(param.shape, group["rank"], side)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = moments.load()
        projected_adamw_step(
            param,
            low_rank_grad,
            exp_avg,
            exp_avg_sq,
            state["proj"],
            side,
            step=state["step"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            scale=group["scale"],
        )
        moments.store(exp_avg, exp_avg_sq)

    def _update_dense(self, group: dict[str, Any], param: Tensor, block: OwnedBlock) -> None:
        assert param.grad is not None
        rows = slice(block.row_start, block.row_stop)
        param_rows = param if block.whole else param.data[rows]
        grad_rows = param.grad if block.whole else param.grad[rows]
        state = self.state[param]
        update_dense_block(state, group, param_rows, grad_rows)

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

    # -- saving and loading (the formats: gnlorp_dist.optim.state_dict) ------------------

    def consolidate_state_dict(self) -> dict[str, Any]:
        """Gather the whole job's state (a collective: EVERY rank calls it), cache and return it.

        :meth:`state_dict` then returns it on any rank without communicating, until the next
        ``step()``, ``step_parameter()`` or ``load_state_dict()``: call this on every rank before
        a rank-0-only save (``transformers.Trainer``). Cost: one ``all_gather_object`` of every
        rank's state (CPU tensors); each rank holds the full state in host memory while cached.
        A rank whose peers do not join within ``$GNLORP_STATE_DICT_TIMEOUT_S`` seconds (default
        60) raises a ValueError naming the fix instead of hanging. Under DeepSpeed ZeRO
        (flattened groups) nothing is gathered: this rank's shard is returned, as state_dict().
        """
        if self.comm.world_size > 1 and state_io.is_flattened(self):
            return self.state_dict()  # ZeRO: the engine saves every rank's own shard
        state_io.wait_for_every_rank(self.comm)
        self._consolidated = state_io.consolidate(self, super().state_dict())
        return self._consolidated

    def drop_consolidated_state(self) -> None:
        """Free the state cached by :meth:`consolidate_state_dict` (after the save)."""
        self._consolidated = None

    def state_dict(self) -> dict[str, Any]:
        """The whole job's optimizer state, the same on every rank and for any world size.

        Torch's format plus ``"gnlorp": {"format": 1, "consolidated": True, "world_size": N}``;
        tensors and plain values only (``torch.load(weights_only=True)``). One process: torch's
        ``state_dict()``. Several ranks: the state cached by :meth:`consolidate_state_dict`
        since the last step, else this call consolidates, which needs EVERY rank to call it
        (``accelerate``'s ``save_state`` does); called on one rank alone it raises a ValueError
        after ``$GNLORP_STATE_DICT_TIMEOUT_S`` seconds (default 60) instead of hanging. Under
        DeepSpeed ZeRO (flattened groups; the engine saves one per rank): this rank's shard,
        marked ``"consolidated": False`` with its rank and world size.
        """
        if self.comm.world_size == 1 or state_io.is_flattened(self):
            return state_io.with_marker(self, super().state_dict())
        if self._consolidated is None:
            self.consolidate_state_dict()
        assert self._consolidated is not None
        return self._consolidated

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` saved on any number of ranks, keeping this rank's shard.

        A state dict holding one rank's shard only (a ZeRO rank's, or one saved by an older
        gnlorp_dist) is refused with a ValueError unless it belongs to this rank and world size.
        """
        loaded = state_io.prepare_to_load(self, state_dict)
        self._consolidated = None
        super().load_state_dict(loaded)
        # torch rebuilt the group dicts; the new ones are what engines step from now on.
        self.groups_at_construction = list(self.param_groups)
        self._lookup = None
        state_io.restore_saved_dtypes(self, loaded)


class GradNormLoRPAdamW8bit(GradNormLoRPAdamW):
    """``GradNormLoRPAdamW(..., bits=8)``: block-wise 8-bit Adam moments."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> None:
        if "bits" in kwargs:
            raise ValueError(f"GradNormLoRPAdamW8bit takes no bits= (got {kwargs['bits']!r})")
        super().__init__(params, bits=8, **kwargs)
