"""The optimizer's parameters as its groups were built, and THE ownership plan over them.

Engines that flatten parameters (DeepSpeed ZeRO) replace each group's ``params`` by their own
flat tensors; the table keeps, per group, the model's own tensors, their true shapes, the group
dict and its parsed :class:`~gnlorp_dist.optim.spec.GroupSpec`, so every step maps the engine's
runs back to matrices. The ownership plan (which rank keeps which state) is computed from those
shapes alone, so every rank computes the same one.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gnlorp_dist.optim.fragments import ModelParameter
from gnlorp_dist.optim.layouts import Layout, detect_layout
from gnlorp_dist.optim.ownership import OwnedBlock, plan_ownership
from gnlorp_dist.optim.spec import GroupSpec, group_params, parse_group


class ParamTable:
    """Every group's dict, spec, model tensors and true shapes, in the order they were added."""

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = []
        """The group dicts (torch's ``param_groups`` entries; replaced by ``load_state_dict``)."""
        self.specs: list[GroupSpec] = []
        """Each group's parsed spec."""
        self.model_params: list[list[Tensor]] = []
        """Each group's tensors as the optimizer was given them (the model's own)."""
        self.true_shapes: list[list[tuple[int, ...]]] = []
        """Their shapes before any engine partitioned them."""
        self._blocks: list[list[OwnedBlock]] | None = None
        self._ownership: tuple[tuple[int, ...], dict[Tensor, list[OwnedBlock]]] | None = None
        self._lookup: dict[Tensor, tuple[int, str]] | None = None

    def add(
        self,
        group: dict[str, Any],
        spec: GroupSpec,
        params: list[Tensor],
        shapes: list[tuple[int, ...]],
    ) -> None:
        """A new group (every plan and lookup is rebuilt at its next use)."""
        self.groups.append(group)
        self.specs.append(spec)
        self.model_params.append(params)
        self.true_shapes.append(shapes)
        self._blocks, self._ownership, self._lookup = None, None, None

    def replace_groups(self, groups: list[dict[str, Any]]) -> None:
        """After ``load_state_dict``: torch rebuilt the group dicts (the saved values); the new
        ones are parsed, and are what engines step from now on."""
        self.specs = [
            parse_group(group, index, self.model_params[index])
            for index, group in enumerate(groups)
        ]
        self.groups = list(groups)
        self._lookup = None

    def index_of(self, group: dict[str, Any]) -> int:
        """Which group ``group`` is (by identity)."""
        for index, candidate in enumerate(self.groups):
            if candidate is group:
                return index
        raise ValueError(
            "a param group reached GradNormLoRPAdamW.step() that this optimizer did not "
            "build (an engine replaced the group dicts); add every group before "
            "deepspeed.initialize and load state with optimizer.load_state_dict"
        )

    def model_parameters(
        self, group_index: int, stepped: list[Tensor] | None = None
    ) -> list[ModelParameter]:
        """The group's parameters with their true shapes and names; their tensors are the ones
        ``step()`` updates (``stepped``: an engine's same-shaped copies, as ZeRO-0 steps fp32
        copies), else the model's own."""
        spec = self.specs[group_index]
        tensors = stepped if stepped is not None else self.model_params[group_index]
        return [
            ModelParameter(
                tensor=param,
                shape=self.true_shapes[group_index][i],
                name=spec.name(group_index, i),
            )
            for i, param in enumerate(tensors)
        ]

    def names(self) -> list[str]:
        """Every parameter's name, by its position over all groups."""
        return [
            spec.name(group_index, i)
            for group_index, spec in enumerate(self.specs)
            for i in range(len(self.model_params[group_index]))
        ]

    def position(self, group_index: int, index: int) -> int:
        """The position of a group's ``index``-th parameter over all groups."""
        return sum(len(p) for p in self.model_params[:group_index]) + index

    def find(self, param: Tensor) -> tuple[int, str]:
        """``param``'s group index and its name (from ``param_names``, else its position)."""
        if self._lookup is None:
            self._lookup = {}
            for group_index, group in enumerate(self.groups):
                spec = self.specs[group_index]
                for index, candidate in enumerate(group_params(group)):
                    self._lookup[candidate] = (group_index, spec.name(group_index, index))
        if param not in self._lookup:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not in this optimizer")
        return self._lookup[param]

    def plan(self, world_size: int) -> list[list[OwnedBlock]]:
        """THE ownership plan (computed once): the blocks of every parameter, by its position
        over all groups, from the true shapes recorded when the groups were added."""
        if self._blocks is None:
            shapes, ranks, proj_types = [], [], []
            for index, spec in enumerate(self.specs):
                projection = spec.projection
                for shape in self.true_shapes[index]:
                    if projection is None:
                        shapes.append(shape)
                        ranks.append(None)
                        proj_types.append(None)
                        continue
                    # A projected matrix is owned whole: sized by its projected state.
                    projected = len(shape) == 2
                    shapes.append(projection.projected_shape(shape) if projected else shape)
                    ranks.append(projection.rank)
                    proj_types.append(projection.planning_proj_type)
            plan = plan_ownership(shapes, ranks, proj_types, world_size)
            self._blocks = [[] for _ in shapes]
            for block in plan:
                self._blocks[block.param_index].append(block)
        return self._blocks

    def ownership(self, world_size: int) -> dict[Tensor, list[OwnedBlock]]:
        """For each parameter tensor, its blocks and their owners (cached: hooks ask per
        parameter; rebuilt when an engine swaps a group's parameter list)."""
        lists = tuple(id(group_params(group)) for group in self.groups)
        if self._ownership is None or self._ownership[0] != lists:
            params = []
            for index, group in enumerate(self.groups):
                stepped = list(group_params(group))  # an engine's same-shaped copies (ZeRO-0)
                same = len(stepped) == len(self.model_params[index])
                params += stepped if same else self.model_params[index]
            self._ownership = (lists, dict(zip(params, self.plan(world_size), strict=True)))
        return self._ownership[1]

    def layouts(self, groups: list[dict[str, Any]]) -> list[Layout]:
        """The layout of each of ``groups`` (ours) as the engine holds it now (empty groups
        skipped)."""
        found = []
        for group in groups:
            params = list(group_params(group))
            if params:
                found.append(detect_layout(self.model_params[self.index_of(group)], params))
        return found

    def named_parameters(self) -> list[tuple[ModelParameter, Layout, dict[str, Any]]]:
        """Every parameter with its true shape and name, its group's layout and its group."""
        found = []
        for index, group in enumerate(self.groups):
            stepped = list(group_params(group))
            layout = detect_layout(self.model_params[index], stepped)
            params = self.model_parameters(index, None if layout.flattened else stepped)
            found += [(param, layout, group) for param in params]
        return found
