"""The typed optimizer spec: THE parser of GaLore-style param-group dicts.

Users (and :func:`~gnlorp_dist.optim.groups.projected_param_groups`) describe a param group as a
dict with GaLore's keys; torch's optimizer keeps those dicts (``state_dict()["param_groups"]``,
LR schedulers). This module is the only place in :mod:`gnlorp_dist.optim` that reads them by
key: :func:`parse_group` turns a group into a :class:`GroupSpec` when the group is added (and
again after ``load_state_dict``, which replaces the dicts' values), and that parse IS the
validation (a ValueError naming the value and the fix). Everything else reads attributes.

Two kinds of values:

- the spec (projection and moments), fixed once parsed: :class:`ProjectionSpec`,
  :class:`MomentSpec`;
- the per-step hyperparameters ``lr``, ``betas``, ``eps``, ``weight_decay``, which LR
  schedulers (and torch's ``load_state_dict``) change in the dict between steps: read afresh
  at every step by :func:`hyperparameters`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gnlorp_dist.optim.projection import PROJ_TYPES, SVD_METHODS, Side, projection_side
from gnlorp_dist.optim.projection import projection_shape as basis_shape
from gnlorp_dist.optim.quantized_basis import PROJ_BITS
from gnlorp_dist.optim.vlorp import BASIS_KINDS, check_granularity

MAX_GAP_FACTOR = 8
"""Lazy refresh lengthens the gap to at most this many ``update_proj_gap`` by default."""
SECOND_MOMENTS: tuple[str, ...] = ("adam", "factored")
OPTIMIZER_PROJ_TYPES: tuple[str, ...] = (*PROJ_TYPES, "random")
"""The SVD side rules and ``"random"`` (VLoRP's seeded Gaussian or Rademacher basis, right
side)."""
PROJECTED_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
"""The keys a projected group must carry (GaLore's)."""
BASIS_DEVICE_KEY = "random_basis_device"
"""The param-group key (saved in ``state_dict()["param_groups"]``) recording the device type
(``"cpu"``, ``"cuda"``, ...) whose generator draws the group's random bases."""


@dataclass(frozen=True, kw_only=True)
class ProjectionSpec:
    """How a projected group projects its matrices (GaLore's keys, then Q-GaLore's and VLoRP's)."""

    rank: int
    """Directions kept per matrix (``r``)."""
    update_proj_gap: int
    """Steps between subspace refreshes (``T``; GaLore uses 200)."""
    scale: float
    """GaLore's ``scale`` (``alpha``): multiplies the back-projected update."""
    proj_type: str = "std"
    """The side rule (:data:`OPTIMIZER_PROJ_TYPES`); ``"random"``: VLoRP's seeded bases."""
    proj_bits: int | None = None
    """Stored bases as INT8 (8) or INT4 (4) codes; None: in the gradient's dtype."""
    svd_method: str = "auto"
    """``"svd"``, ``"randomized"`` or ``"auto"`` (randomized for large matrices)."""
    lazy_refresh_threshold: float = 0.0
    """Subspace overlap above which the gap to the next refresh doubles; 0: fixed gap."""
    max_update_proj_gap: int | None = None
    """The longest gap lazy refresh reaches; None: :data:`MAX_GAP_FACTOR` x ``update_proj_gap``."""
    granularity: int = 1
    """VLoRP's ``c``: each ``M x N`` gradient is projected as ``(M c, N / c)``."""
    random_basis: str = "gaussian"
    """The distribution of random bases (``proj_type="random"``): Gaussian or Rademacher."""
    projection_seed: int = 0
    """The seed random bases are derived from (with the parameter's position and the window)."""

    @property
    def random(self) -> bool:
        """Random bases (VLoRP): regenerated from seeds, never stored, refreshed or sent."""
        return self.proj_type == "random"

    @property
    def lazy(self) -> bool:
        """Whether lazy refresh is on."""
        return self.lazy_refresh_threshold > 0.0

    @property
    def max_gap(self) -> int:
        """The longest refresh gap lazy refresh may reach."""
        if self.max_update_proj_gap is None:
            return MAX_GAP_FACTOR * self.update_proj_gap
        return self.max_update_proj_gap

    @property
    def back_divisor(self) -> int:
        """What the back-projection divides by: ``r`` for a random basis (``E[P^T P] = r I``),
        1 for an orthonormal one."""
        return self.rank if self.random else 1

    @property
    def planning_proj_type(self) -> str:
        """The proj_type the ownership plan sizes states with (it knows the SVD rules only)."""
        return "right" if self.random else self.proj_type

    def projected_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The shape a ``shape`` matrix is projected in: ``(M c, N / c)``, or ``shape``. The
        row-major reshape keeps every element's flat index, so runs of the matrix stay runs."""
        rows, cols = shape
        c = self.granularity
        return (rows * c, cols // c) if c > 1 else (rows, cols)

    def side(self, shape: tuple[int, ...]) -> Side:
        """The side a ``shape`` matrix is projected on (of its projected shape)."""
        if self.random:
            return "right"
        return projection_side(self.projected_shape(shape), self.proj_type)


@dataclass(frozen=True, kw_only=True)
class MomentSpec:
    """How a group keeps Adam's moments."""

    bits: int = 32
    """32: float moments; 8: block-wise 8-bit codes (:mod:`gnlorp_dist.optim.quantized`)."""
    min_8bit_size: int = 4096
    """Tensors with fewer moment elements stay float32 under ``bits=8`` (bitsandbytes' rule)."""
    second_moment: str = "adam"
    """``"adam"`` (a low-rank ``v``) or ``"factored"`` (ProjFactor's row and column sums;
    projected groups only)."""

    @property
    def factored(self) -> bool:
        """ProjFactor's factored second moment (:mod:`gnlorp_dist.optim.projfactor`)."""
        return self.second_moment == "factored"


@dataclass(frozen=True, kw_only=True)
class GroupSpec:
    """One param group, parsed."""

    projection: ProjectionSpec | None
    """How its matrices are projected; None: a dense group (plain AdamW)."""
    moments: MomentSpec
    """How its moments are kept."""
    param_names: tuple[str, ...] | None = None
    """The parameters' names (``param_names``), if the group gives them."""

    def name(self, group_index: int, index: int) -> str:
        """Parameter ``index``'s name: its ``param_names`` entry, else its position."""
        if self.param_names:
            return self.param_names[index]
        return f"param_groups[{group_index}][{index}]"


@dataclass(frozen=True, kw_only=True)
class StepHyperparameters:
    """The values an LR schedule may change between steps, as one step reads them."""

    lr: float
    """The learning rate."""
    betas: tuple[float, float]
    """Adam's ``(beta1, beta2)``."""
    eps: float
    """Adam's ``eps``."""
    weight_decay: float
    """Decoupled weight decay."""


# -- reading a group -------------------------------------------------------------------------


def hyperparameters(group: dict[str, Any]) -> StepHyperparameters:
    """The group's per-step hyperparameters as they are now (read at every step). A Tensor
    ``lr`` or ``betas`` (torch's compile recipe) is read as its value, as ``torch.optim.AdamW``'s
    for-loop reads it (one host read each on an accelerator)."""
    given = _given(group, StepHyperparameters)
    if "lr" in given:
        given["lr"] = _number(given["lr"])
    if "betas" in given:
        given["betas"] = tuple(_number(beta) for beta in given["betas"])
    return StepHyperparameters(**given)


def _number(value: Any) -> Any:
    """A one-element Tensor's value as a Python float; anything else as it is."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


CONSTRUCTOR_OPTIONS = ("lr", "betas", "eps", "weight_decay", "bits", "min_8bit_size")
"""The options every group carries: given in the group, else the optimizer's keyword arguments."""


def fill_group_defaults(
    groups: list[dict[str, Any]],
    replaced: list[dict[str, Any]] | None,
    defaults: dict[str, Any],
) -> None:
    """Give each group the :data:`CONSTRUCTOR_OPTIONS` it lacks (a state dict saved before a key
    existed, or a ``torch.optim.AdamW`` one): the value of the group it replaces (the same
    position), else the optimizer's default, as torch's optimizers fill their newer flags."""
    for index, group in enumerate(groups):
        before = replaced[index] if replaced is not None and index < len(replaced) else {}
        for key in CONSTRUCTOR_OPTIONS:
            if key in group:
                continue
            if key in before:
                group[key] = before[key]
            elif key in defaults:
                group[key] = defaults[key]


def group_params(group: dict[str, Any]) -> list[Tensor]:
    """The tensors the group holds now (an engine may have replaced the model's own): the
    group's own list, whose identity tells when an engine swapped it; copy it to keep it."""
    return group["params"]


def recorded_basis_device(group: dict[str, Any]) -> str | None:
    """The device type the group's random bases were drawn on (None: not recorded yet)."""
    return group.get(BASIS_DEVICE_KEY)


def record_basis_device(group: dict[str, Any], device_type: str) -> None:
    """Record the device type that draws the group's random bases (saved with the groups)."""
    group[BASIS_DEVICE_KEY] = device_type


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


def _given(group: dict[str, Any], cls: type) -> dict[str, Any]:
    """THE read of a group dict: the fields of dataclass ``cls`` it carries, by their names
    (GaLore's keys, and torch's for the hyperparameters)."""
    return {name: group[name] for name in _field_names(cls) if name in group}


def is_projected(group: dict[str, Any]) -> bool:
    """Whether a group dict describes a projected group (it carries ``rank``, as GaLore's)."""
    return "rank" in group


def parse_group(group: dict[str, Any], group_index: int, params: list[Tensor]) -> GroupSpec:
    """The spec of ``group`` (the ``group_index``-th, holding the model's ``params``), or a
    ValueError naming the offending value and the fix."""
    where = f"param_groups[{group_index}]"
    moments = moments_of(group)
    if moments.bits not in (8, 32):
        raise ValueError(f"bits={moments.bits!r} is not supported; use 32 or 8")
    check_min_8bit_size(moments.min_8bit_size, f"{where}: ")
    names = group.get("param_names")
    spec = GroupSpec(
        projection=None,
        # A dense group is plain AdamW: its second moment is Adam's, whatever the dict says.
        moments=dataclasses.replace(moments, second_moment="adam"),
        param_names=tuple(names) if names else None,
    )
    if is_projected(group):
        missing = [key for key in PROJECTED_GROUP_KEYS if key not in group]
        if missing:
            raise ValueError(
                f"{where} has 'rank' but lacks {missing}; a projected group needs "
                f"{list(PROJECTED_GROUP_KEYS)} (see gnlorp_dist.projected_param_groups)"
            )
        spec = dataclasses.replace(spec, projection=projection_of(group), moments=moments)
        assert spec.projection is not None
        check_projection(spec.projection, spec.moments, where)
        check_projected_shapes(spec, params, where)
    check_finite_hyperparameters(f"{where}: ", **dataclasses.asdict(hyperparameters(group)))
    return spec


def projection_of(group: dict[str, Any]) -> ProjectionSpec | None:
    """The projection a group dict describes (None: a dense group), unchecked: for a saved
    group (``state_dict()["param_groups"]``) before it is loaded, or a caller outside the
    optimizer that holds a group dict (estimators, benchmarks)."""
    return ProjectionSpec(**_given(group, ProjectionSpec)) if is_projected(group) else None


def moments_of(group: dict[str, Any]) -> MomentSpec:
    """The moments a group dict describes, unchecked (see :func:`projection_of`)."""
    return MomentSpec(**_given(group, MomentSpec))


# -- the checks ------------------------------------------------------------------------------


def check_projection(projection: ProjectionSpec, moments: MomentSpec, where: str) -> None:
    """User mistakes in a projected group's values, with the value and the fix."""
    rank, gap, scale = projection.rank, projection.update_proj_gap, projection.scale
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{where}: rank={rank!r} must be a positive integer")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(
            f"{where}: update_proj_gap={gap!r} must be a positive integer (steps between "
            "subspace refreshes; GaLore uses 200)"
        )
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{where}: scale={scale!r} must be a finite number")
    if projection.proj_type not in OPTIMIZER_PROJ_TYPES:
        raise ValueError(
            f"{where}: proj_type={projection.proj_type!r} is not supported; use one of "
            f"{OPTIMIZER_PROJ_TYPES}"
        )
    check_vlorp_options(projection, moments, where)
    if projection.svd_method not in SVD_METHODS:
        raise ValueError(
            f"{where}: svd_method={projection.svd_method!r} is not supported; use one of "
            f"{SVD_METHODS}"
        )
    check_refresh_options(projection, where)


def check_projected_shapes(spec: GroupSpec, params: list[Tensor], where: str) -> None:
    """Each matrix of a projected group fits its projection (2-D, the rank, granularity, side
    and basis bits allow it)."""
    for index, param in enumerate(params):
        name = spec.param_names[index] if spec.param_names else f"{where}['params'][{index}]"
        # A ZeRO-3 partitioned parameter (built under deepspeed.zero.Init) is empty here; its
        # true shape is ds_shape, and the DeepSpeed layout finds its runs at the first step.
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if param.is_complex():
            raise ValueError(
                f"{name}: a complex {param.dtype} matrix cannot be projected (the SVD basis and "
                "GaLore's moments are defined for real matrices). Put complex parameters in a "
                "group without 'rank' (plain AdamW, on their real view as torch.optim.AdamW)."
            )
        if len(shape) != 2:
            raise ValueError(
                f"{name}: shape {shape} cannot be projected; a projected group takes 2-D matrices "
                "only. Put 1-D tensors (biases, norms, magnitudes) in a group without 'rank'."
            )
        check_matrix(spec, name, shape)


def check_matrix(spec: GroupSpec, name: str, shape: tuple[int, int]) -> None:
    """One 2-D matrix of a projected group against its projection."""
    projection = spec.projection
    assert projection is not None
    rank, c = projection.rank, projection.granularity
    if c > 1:
        try:
            check_granularity(shape, c)
        except ValueError as error:
            raise ValueError(
                f"{name}: {error}; pick a granularity dividing every projected matrix's "
                "columns, or leave this matrix out of the projected group"
            ) from None
    projected = projection.projected_shape(shape)
    if rank > min(projected):
        reshaped = f" (reshaped to {projected} by granularity={c})" if c > 1 else ""
        raise ValueError(
            f"{name}: rank={rank} exceeds min(shape)={min(projected)} of shape "
            f"{shape}{reshaped}; use rank <= {min(projected)} or leave this matrix out of "
            "the projected group"
        )
    side = projection.side(shape)
    if c > 1 and side != "right":
        raise ValueError(
            f"{name}: granularity={c} reshapes the {shape} gradient to {projected} and "
            f"projects it on the right, but proj_type={projection.proj_type!r} resolves to the "
            "left side for that shape; use proj_type='right' (SVD basis) or "
            "proj_type='random', or granularity=1"
        )
    if side != "right" and spec.moments.factored:
        raise ValueError(
            f"{name}: second_moment='factored' (ProjFactor) needs a right-side projection, "
            f"but proj_type={projection.proj_type!r} projects the {shape} matrix on the left; "
            "use proj_type='right' or proj_type='random'"
        )
    basis_cols = basis_shape(projected, rank, side)[1]
    if projection.proj_bits == 4 and basis_cols % 2:
        raise ValueError(
            f"{name}: proj_bits=4 packs two values per byte along the basis's last "
            f"dimension, which is {basis_cols} (odd) for shape {shape} projected on the "
            f"{side} at rank={rank}; use an even rank, or proj_bits=8"
        )


def check_refresh_options(projection: ProjectionSpec, where: str) -> None:
    """The basis storage and the lazy refresh rule."""
    proj_bits = projection.proj_bits
    if proj_bits not in PROJ_BITS or isinstance(proj_bits, bool):
        raise ValueError(
            f"{where}: proj_bits={proj_bits!r} is not supported; use None (bases in the "
            "gradient's dtype), 8 (INT8) or 4 (INT4, two per byte)"
        )
    threshold = projection.lazy_refresh_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{where}: lazy_refresh_threshold={threshold!r} must be a number")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"{where}: lazy_refresh_threshold={threshold!r} must be in [0, 1] (the subspace "
            "overlap above which the refresh gap doubles; 0 turns lazy refresh off)"
        )
    gap = projection.update_proj_gap
    most = projection.max_update_proj_gap
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < gap):
        raise ValueError(
            f"{where}: max_update_proj_gap={most!r} must be an integer >= update_proj_gap={gap}"
        )


def check_vlorp_options(projection: ProjectionSpec, moments: MomentSpec, where: str) -> None:
    """VLoRP's and ProjFactor's group options (granularity, random bases, second moment)."""
    c = projection.granularity
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(
            f"{where}: granularity={c!r} must be a positive integer (1: project rows as "
            "GaLore does; c > 1 reshapes each M x N gradient to (M c, N / c))"
        )
    seed = projection.projection_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{where}: projection_seed={seed!r} must be an integer >= 0")
    if projection.random_basis not in BASIS_KINDS:
        raise ValueError(
            f"{where}: random_basis={projection.random_basis!r} is not supported; use one of "
            f"{BASIS_KINDS}"
        )
    if moments.second_moment not in SECOND_MOMENTS:
        raise ValueError(
            f"{where}: second_moment={moments.second_moment!r} is not supported; use 'adam' (a "
            "low-rank v) or 'factored' (ProjFactor: row and column sums of the full-shape "
            "squared gradient)"
        )
    if not projection.random:
        return
    if projection.proj_bits is not None:
        raise ValueError(
            f"{where}: proj_bits={projection.proj_bits!r} quantises stored bases, but "
            "proj_type='random' stores none (each basis is regenerated from its seed); drop "
            "proj_bits, or use an SVD proj_type"
        )
    if float(projection.lazy_refresh_threshold) > 0.0:
        raise ValueError(
            f"{where}: lazy_refresh_threshold={projection.lazy_refresh_threshold!r} lengthens "
            "the gap after a refresh whose subspace did not move, but random bases of different "
            "windows are independent draws (their overlap measures nothing); drop "
            "lazy_refresh_threshold with proj_type='random', or use an SVD proj_type"
        )


def check_min_8bit_size(value: int, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{where}min_8bit_size={value!r} must be an int >= 1 (tensors with fewer elements "
            "keep float32 moments; bitsandbytes' default is 4096)"
        )


def check_finite_hyperparameters(where: str, **values: object) -> None:
    """NaN or infinite lr / eps / weight_decay / betas would poison every weight at once."""
    for name, value in values.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, (int, float)) and not math.isfinite(item):
                raise ValueError(f"{where}{name}={value!r} must be finite")
