"""``transformers.Trainer`` (and TRL's ``SFTTrainer``) with GradNormLoRPAdamW.

Two entry points:

- :class:`GradNormLoRPTrainer` (``Trainer`` subclass), or :class:`GradNormLoRPTrainerMixin` over
  any ``Trainer`` subclass (``GradNormLoRPSFTTrainer`` is the mixin over TRL's ``SFTTrainer``,
  imported only when asked for). It builds the optimizer in ``create_optimizer`` (so DeepSpeed
  ZeRO 0-3 under ``TrainingArguments(deepspeed=...)`` gets it too), consolidates the sharded
  optimizer state before the Trainer's rank-0-only checkpoint save, and makes
  ``trainer.save_model()`` write the merged model (weight norm folded in) that stock
  ``from_pretrained`` loads; the Trainer's own checkpoints keep the unmerged weights resume needs.
- :func:`gnlorp_optimizer_cls_and_kwargs` for a plain ``Trainer(optimizer_cls_and_kwargs=...)``
  or any other trainer, with :class:`GradNormLoRPCallback` for the checkpoint consolidation.

transformers is imported only inside this module (``import gnlorp_dist`` does not import it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from gnlorp_dist.distributed import communicator_for_current_process
from gnlorp_dist.nn import DEFAULT_TARGET_MODULES, WeightNormLinear
from gnlorp_dist.optim import GradNormLoRPAdamW, projected_param_groups
from gnlorp_dist.optim.projection import SVD_METHODS
from gnlorp_dist.optim.projector import state_layout
from gnlorp_dist.optim.quantized import BLOCK_SIZE, MIN_8BIT_NUMEL, stores_8bit
from gnlorp_dist.optim.spec import SECOND_MOMENTS, check_min_8bit_size
from gnlorp_dist.optim.vlorp import BASIS_KINDS
from gnlorp_dist.options.optimizer import (
    BASIS_BITS,
    OPTIMIZER_PROJ_TYPES,
    STATE_BITS,
    MomentOptions,
    ProjectionOptions,
)

_logger = logging.getLogger(__name__)

_PER_LAYER_REFUSAL = (
    "per_layer=True is not supported in the Trainer: PerLayerUpdates steps every parameter "
    "inside backward, while the Trainer calls optimizer.step(), clips the global gradient norm "
    "and accumulates gradients over the whole model itself (and DeepSpeed owns backward). Set "
    "per_layer=False here, or train per-layer with `gnlorp-train --per-layer` or a hand-written "
    "loop around gnlorp_dist.PerLayerUpdates."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradNormLoRPConfig(MomentOptions, ProjectionOptions):
    """The GradNormLoRP options a Trainer run adds to its ``TrainingArguments``.

    The projection and moment options are gnlorp-train's (:class:`~gnlorp_dist.options.
    optimizer.ProjectionOptions`, :class:`~gnlorp_dist.options.optimizer.MomentOptions`: the
    same names, values and meanings as its flags and as the optimizer's param-group keys);
    ``rank``, ``update_proj_gap`` and ``scale`` default to GaLore's Trainer values here. ``lr``,
    betas, eps and weight decay come from the ``TrainingArguments`` (``learning_rate``,
    ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``weight_decay``; the decay applies to
    every group, as in GaLore). Build one directly, or from the Trainer's own ``optim_args`` /
    ``optim_target_modules`` with :meth:`from_training_args`.
    """

    rank: int = 128
    """Projection rank r of every targeted matrix."""
    update_proj_gap: int = 200
    """Subspace refresh gap T, in optimizer steps."""
    scale: float = 0.25
    """Scale alpha of the projected update."""
    per_layer: bool = False
    """Refused in a Trainer (it steps, clips and accumulates itself); kept so the refusal is
    explicit rather than an unknown-option error."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Modules whose weights are projected: names, qualified names or globs (see
    projected_param_groups)."""
    min_8bit_size: int = MIN_8BIT_NUMEL
    """With ``bits=8``: tensors whose Adam moment (the low-rank one, if projected) has fewer
    elements keep float32 moments (bitsandbytes' name and default). On a small model every
    moment may be under it: the optimizer's construction logs how many tensors are 8-bit."""

    def __post_init__(self) -> None:
        targets = self.target_modules
        object.__setattr__(
            self, "target_modules", (targets,) if isinstance(targets, str) else tuple(targets)
        )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive int, e.g. 128")
        if not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            raise ValueError(f"update_proj_gap={self.update_proj_gap!r} must be an int >= 1")
        if not self.scale > 0:
            raise ValueError(f"scale={self.scale!r} must be > 0, e.g. 0.25")
        if self.bits not in STATE_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; use 32 or 8")
        check_min_8bit_size(self.min_8bit_size, "")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}")

    def param_group_options(self) -> dict[str, Any]:
        """``projected_param_groups(**options)`` beyond GaLore's four keys (only those set)."""
        options = {**self.projection_group_options(), **self.moment_group_options()}
        if options["svd_method"] == "auto":  # the optimizer's default: keep GaLore's keys
            del options["svd_method"]
        return options

    @classmethod
    def from_training_args(cls, args: TrainingArguments) -> GradNormLoRPConfig:
        """Options from ``args.optim_args`` (``"rank=128,update_proj_gap=200,scale=0.25,
        proj_type=std,bits=8"``, GaLore's syntax; any field but target_modules) and
        ``args.optim_target_modules``."""
        kwargs: dict[str, Any] = {}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        defaults.pop("target_modules")
        for item in filter(None, (args.optim_args or "").replace(" ", "").split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in defaults:
                raise ValueError(
                    f"optim_args item {item!r} is not key=value with key in "
                    f"{sorted(defaults)}; e.g. 'rank=128,update_proj_gap=200'"
                )
            kwargs[key] = _option_value(value, type(defaults[key]))
        targets = args.optim_target_modules
        if targets:
            kwargs["target_modules"] = (targets,) if isinstance(targets, str) else tuple(targets)
        return cls(**kwargs)


_CHOICES = {
    "proj_type": OPTIMIZER_PROJ_TYPES,
    "proj_bits": BASIS_BITS,
    "svd_method": SVD_METHODS,
    "random_basis": BASIS_KINDS,
    "second_moment": SECOND_MOMENTS,
}


def _option_value(text: str, kind: type) -> Any:
    """``text`` of an ``optim_args`` item as the option's type (that of its default)."""
    if kind is bool:
        return text.lower() in ("1", "true", "yes")
    return kind(text)


def _refuse_per_layer(config: GradNormLoRPConfig) -> None:
    if config.per_layer:
        raise ValueError(_PER_LAYER_REFUSAL)


def gnlorp_optimizer_cls_and_kwargs(
    model: nn.Module, args: TrainingArguments, config: GradNormLoRPConfig | None = None
) -> tuple[type[GradNormLoRPAdamW], dict[str, Any]]:
    """``(GradNormLoRPAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``kwargs["params"]`` holds :func:`projected_param_groups` of ``model`` (the Trainer uses it
    instead of its own two plain groups, which would make our optimizer plain AdamW). Works under
    ``TrainingArguments(deepspeed=...)`` too. With several DDP ranks, add
    :class:`GradNormLoRPCallback` so Trainer checkpoints hold every rank's optimizer state.
    """
    config = config if config is not None else GradNormLoRPConfig.from_training_args(args)
    _refuse_per_layer(config)
    groups = projected_param_groups(
        model,
        rank=config.rank,
        update_proj_gap=config.update_proj_gap,
        scale=config.scale,
        proj_type=config.proj_type,
        target_modules=config.target_modules,
        **config.param_group_options(),
    )
    kwargs = {
        "params": groups,
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        "bits": config.bits,
        "min_8bit_size": config.min_8bit_size,
    }
    if config.bits == 8:
        _log_eight_bit(eight_bit_summary(groups, config.min_8bit_size), config.min_8bit_size)
    return GradNormLoRPAdamW, kwargs


@dataclasses.dataclass(frozen=True, kw_only=True)
class EightBitSummary:
    """Which tensors of a ``bits=8`` optimizer keep 8-bit Adam moments."""

    tensors: int
    """Tensors with Adam moments (every parameter of every group)."""
    eight_bit_tensors: int
    """Those whose moments are 8-bit codes (:func:`~gnlorp_dist.optim.quantized.stores_8bit`)."""
    eight_bit_bytes: int
    """Bytes of those 8-bit moments: two moments' codes and block scales."""
    float_bytes: int
    """Bytes of the other tensors' moments, kept in floats of the parameter's size."""


def eight_bit_summary(groups: list[dict[str, Any]], min_8bit_size: int) -> EightBitSummary:
    """What ``bits=8`` makes 8-bit in ``groups`` (``projected_param_groups``' dicts): each
    tensor's moment size (low-rank if projected) against ``min_8bit_size``."""
    tensors = eight_bit = eight_bit_bytes = float_bytes = 0
    for group in groups:
        for param in group["params"]:
            shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the true shape
            projected = group.get("rank") is not None and len(shape) == 2
            numel = state_layout(shape, group)[0] if projected else math.prod(shape)
            tensors += 1
            if stores_8bit(8, numel, min_8bit_size):
                eight_bit += 1
                eight_bit_bytes += 2 * (numel + 4 * -(-numel // BLOCK_SIZE))
            else:
                float_bytes += 2 * numel * param.element_size()
    return EightBitSummary(
        tensors=tensors,
        eight_bit_tensors=eight_bit,
        eight_bit_bytes=eight_bit_bytes,
        float_bytes=float_bytes,
    )


def _log_eight_bit(summary: EightBitSummary, min_8bit_size: int) -> None:
    message = (
        f"bits=8: {summary.eight_bit_tensors} of {summary.tensors} tensors keep 8-bit Adam "
        f"moments ({summary.eight_bit_bytes} bytes); the other "
        f"{summary.tensors - summary.eight_bit_tensors} are under min_8bit_size={min_8bit_size} "
        f"elements and keep float moments ({summary.float_bytes} bytes)"
    )
    if summary.eight_bit_tensors == 0:
        _logger.warning(
            f"{message}: nothing is quantised. Lower GradNormLoRPConfig(min_8bit_size=...) "
            "(optim_args 'min_8bit_size=...') to quantise smaller tensors, or use bits=32."
        )
    else:
        _logger.info(message)


def build_gnlorp_optimizer(
    model: nn.Module, args: TrainingArguments, config: GradNormLoRPConfig | None = None
) -> GradNormLoRPAdamW:
    """The GradNormLoRPAdamW a Trainer run with ``args`` and ``config`` trains ``model`` with."""
    cls, kwargs = gnlorp_optimizer_cls_and_kwargs(model, args, config)
    return cls(kwargs.pop("params"), **kwargs)


def _find_gnlorp(optimizer: Any) -> GradNormLoRPAdamW | None:
    """Our optimizer inside Accelerate's / DeepSpeed's wrappers, if it is one."""
    for _ in range(4):  # AcceleratedOptimizer -> (DeepSpeed ZeRO optimizer) -> ours
        if isinstance(optimizer, GradNormLoRPAdamW):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def consolidate_for_save(optimizer: Any) -> None:
    """Call on EVERY rank before a rank-0-only ``optimizer.state_dict()`` save (Trainer,
    ``Accelerator.save_state``): gathers the sharded state so rank 0's ``state_dict()`` holds
    every rank's shard. A no-op on one process and for other optimizers."""
    ours = _find_gnlorp(optimizer)
    if ours is None or communicator_for_current_process() is None:
        return  # one process: the state is whole already
    consolidate = getattr(ours, "consolidate_state_dict", None)
    if consolidate is None:
        warnings.warn(
            "this gnlorp_dist version lacks GradNormLoRPAdamW.consolidate_state_dict: the "
            "checkpoint holds rank 0's optimizer shard only and a resume on several ranks "
            "restarts the other ranks' low-rank states; upgrade gnlorp_dist",
            stacklevel=2,
        )
        return
    consolidate()


class GradNormLoRPCallback(TrainerCallback):
    """For a plain ``Trainer`` given our optimizer (``optimizer_cls_and_kwargs``): before each
    checkpoint save, gathers every DDP rank's optimizer shard so the Trainer's rank-0-only
    ``optimizer.state_dict()`` save holds the whole state (resume on any world size).

    Not needed with :class:`GradNormLoRPTrainer` (it does the same) nor under DeepSpeed (each
    rank saves its own shard in the engine checkpoint)."""

    def _maybe_consolidate(self, args: TrainingArguments, control: Any, kwargs: dict) -> None:
        if control.should_save and not args.deepspeed and not args.save_only_model:
            consolidate_for_save(kwargs.get("optimizer"))

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, D102
        self._maybe_consolidate(args, control, kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, D102
        self._maybe_consolidate(args, control, kwargs)


# -- the merged model --------------------------------------------------------------------------


def has_weight_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds :class:`WeightNormLinear` layers (what ``save_model`` merges)."""
    return any(isinstance(m, WeightNormLinear) for m in model.modules())


@contextmanager
def _gathered(params: list[Tensor]) -> Iterator[None]:
    """DeepSpeed ZeRO-3 partitioned parameters gathered whole on every rank (a collective)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed  # noqa: PLC0415  (only when the model is ZeRO-3 partitioned)

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict with every :class:`WeightNormLinear` folded into ``name.weight``
    (and ``name.bias``): the keys and shapes of the model before ``apply_weight_norm``, so
    ``save_pretrained(state_dict=...)`` writes what stock ``from_pretrained`` loads.

    ``model`` is left untouched. Under DeepSpeed ZeRO-3 every rank must call this (each
    parameter is gathered in turn); the result is whole on every rank.
    """
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    layers = {name: m for name, m in model.named_modules() if isinstance(m, WeightNormLinear)}
    merged: dict[str, Tensor] = {}
    for name, layer in layers.items():
        with _gathered(list(layer.parameters())), torch.no_grad():
            linear = layer.to_linear()
        merged[f"{name}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            merged[f"{name}.bias"] = linear.bias.detach()

    def inside_layer(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))

    params = dict(model.named_parameters(remove_duplicate=False))
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if inside_layer(key):
            continue
        param = params.get(key)
        with _gathered([param] if param is not None else []):
            state[key] = value.detach().clone()
    state.update(merged)
    return state


class GradNormLoRPTrainerMixin:
    """Put before a ``Trainer`` subclass: ``class T(GradNormLoRPTrainerMixin, SFTTrainer)``.

    Adds the keyword ``gnlorp_config`` (a :class:`GradNormLoRPConfig`; default: parsed from
    ``args.optim_args`` / ``args.optim_target_modules``) and:

    - ``create_optimizer`` builds GradNormLoRPAdamW over :func:`projected_param_groups`, so the
      DeepSpeed path (which calls ``create_optimizer``) trains with it too;
    - checkpoint saves consolidate the sharded optimizer state first (every DDP rank), so the
      Trainer's rank-0 ``optimizer.pt`` resumes on any world size;
    - ``save_model()`` called by the user writes the merged model (plain ``nn.Linear`` weights,
      stock ``from_pretrained`` loads it); the Trainer's checkpoints keep the unmerged weights.

    Refused with ValueError: ``optimizers=(optimizer, ...)`` together with a DeepSpeed config
    (the Trainer would silently train with torch AdamW instead), ``optimizer_cls_and_kwargs``
    (this class builds the optimizer), a DeepSpeed config our optimizer cannot run under
    (:func:`gnlorp_dist.integrations.deepspeed.check_deepspeed_config`), and ``per_layer=True``.
    """

    def __init__(self, *args: Any, gnlorp_config: GradNormLoRPConfig | None = None, **kwargs: Any):
        # Refusals first, before the Trainer sets up processes and engines. Trainer's positional
        # order is (model, args, ...); every other argument checked here is keyword-only in use.
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(
                f"{type(self).__name__} builds GradNormLoRPAdamW itself; drop "
                "optimizer_cls_and_kwargs and pass gnlorp_config=GradNormLoRPConfig(...)"
            )
        given = (kwargs.get("optimizers") or (None, None))[0]
        if given is not None and getattr(training_args, "deepspeed", None):
            raise ValueError(
                f"optimizers=({type(given).__name__}(...), ...) with TrainingArguments(deepspeed="
                "...): the Trainer ignores a given optimizer under DeepSpeed and trains with torch "
                f"AdamW. Drop optimizers=; {type(self).__name__} builds GradNormLoRPAdamW from "
                "gnlorp_config in create_optimizer."
            )
        if gnlorp_config is None and training_args is not None:
            gnlorp_config = GradNormLoRPConfig.from_training_args(training_args)
        if gnlorp_config is not None:
            _refuse_per_layer(gnlorp_config)
        if getattr(training_args, "deepspeed", None):
            from gnlorp_dist.integrations.deepspeed import check_deepspeed_config  # noqa: PLC0415

            check_deepspeed_config(training_args.hf_deepspeed_config.config, allow_auto=True)
        super().__init__(*args, **kwargs)
        self.gnlorp_config = (
            gnlorp_config
            if gnlorp_config is not None
            else GradNormLoRPConfig.from_training_args(self.args)
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """GradNormLoRPAdamW over ``model``'s projected/dense groups (once)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = build_gnlorp_optimizer(opt_model, self.args, self.gnlorp_config)
        return self.optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Called on every rank; the Trainer then saves optimizer.state_dict() from rank 0 only,
        # which without consolidation would hold rank 0's shard alone. DeepSpeed instead saves
        # each rank's own state_dict() in its engine checkpoint.
        if not self.is_deepspeed_enabled:
            consolidate_for_save(self.optimizer)
        super()._save_optimizer_and_scheduler(output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The merged model when the user calls it; the Trainer's unmerged weights (what
        ``resume_from_checkpoint`` loads back) when the Trainer saves a checkpoint.

        Call it on every rank (a collective under ZeRO-3); rank 0 writes.
        """
        if _internal_call or not has_weight_norm(self.model):
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = merged_state_dict(self.model)
        # _save hands state_dict to save_pretrained of the weight-normed model: config and
        # tokenizer are written as usual, the weights under the original architecture's keys.
        # Only the writing rank calls it, as Trainer.save_model does: up to transformers 5.17
        # _save assumes it runs on process zero and writes from any rank that calls it; 5.23
        # returns early on the others, except for a model sharded at load time, whose other
        # ranks must join _save's gathers.
        if self.args.should_save or getattr(self, "is_distributed_loading_by_transformers", False):
            self._save(output_dir, state_dict=state_dict)
        return None


class GradNormLoRPTrainer(GradNormLoRPTrainerMixin, Trainer):
    """``transformers.Trainer`` training with GradNormLoRPAdamW (see the mixin)."""


def __getattr__(name: str) -> Any:
    # TRL is optional: the SFTTrainer variant is built (and trl imported) on first access only.
    if name == "GradNormLoRPSFTTrainer":
        from trl import SFTTrainer  # noqa: PLC0415

        cls = type(
            "GradNormLoRPSFTTrainer",
            (GradNormLoRPTrainerMixin, SFTTrainer),
            {"__doc__": "TRL's ``SFTTrainer`` training with GradNormLoRPAdamW (see the mixin)."},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# GradNormLoRPSFTTrainer is left out: `import *` would then import TRL.
__all__ = [
    "GradNormLoRPCallback",
    "GradNormLoRPConfig",
    "GradNormLoRPTrainer",
    "GradNormLoRPTrainerMixin",
    "build_gnlorp_optimizer",
    "consolidate_for_save",
    "gnlorp_optimizer_cls_and_kwargs",
    "has_weight_norm",
    "merged_state_dict",
]
