"""Model surgery: swap targeted ``nn.Linear`` layers for :class:`WeightNormLinear` and back."""

from __future__ import annotations

import numbers
import sys
import weakref
from collections.abc import Callable, Iterable

from torch import Tensor, nn

from gnlorp_dist.nn.weight_norm import WeightNormLinear

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Attention and MLP projections of LLaMA-style models; lm_head and embeddings are left alone."""

_MAX_NAMES_LISTED = 12

_MERGED_AWAY: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
"""Parameters of layers that :func:`merge_weight_norm` took out of a model (V, m, LoRA factors):
an optimizer still holding them would step tensors the model no longer uses."""


def was_merged_away(param: Tensor) -> bool:
    """Whether ``param`` belonged to a :class:`WeightNormLinear` that :func:`merge_weight_norm`
    replaced by a plain ``nn.Linear`` (the model no longer computes with it)."""
    # Keyed by identity: tensors compare element-wise, so a set of them cannot be searched.
    return _MERGED_AWAY.get(id(param)) is param


def is_peft_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA/DoRA layer (``peft.tuners.lora.LoraLayer``).

    Recognised by its ``lora_A``/``lora_B`` ``nn.ModuleDict`` (one entry per adapter), so peft need
    not be installed or imported; our own :class:`WeightNormLinear` holds its LoRA factors as
    plain parameters and is not one."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(module, "lora_B", None), nn.ModuleDict
    )


def is_peft_model(model: nn.Module) -> bool:
    """``model`` is a ``peft.PeftModel`` or contains PEFT LoRA layers."""
    # A PeftModel can only exist if peft was imported, so sys.modules is enough to ask.
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, getattr(peft, "PeftModel", ())):
        return True
    return any(is_peft_lora_layer(m) for m in model.modules())


PEFT_ROUTE = (
    "GradNormLoRP's LoRA mode is apply_weight_norm(base_model, lora_rank=r) on the plain model; "
    "for PEFT LoRA/DoRA adapters use projected_param_groups(peft_model) with GradNormLoRPAdamW "
    "(DoRA = weight-normalised LoRA)"
)


def _targeted_children(
    model: nn.Module, target_modules: frozenset[str]
) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """``(parent, attribute name, qualified name, child)`` for every child named in targets."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if child_name in target_modules:
                qualified = f"{parent_name}.{child_name}" if parent_name else child_name
                found.append((parent, child_name, qualified, child))
    return found


def _linear_leaf_names(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name}
    linear_names = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    # Linear layers first: those are the names a caller most likely meant.
    return sorted(linear_names) + sorted(names - linear_names)


def matched_linears(
    model: nn.Module, targets: frozenset[str], why_whole: str
) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """The ``nn.Linear`` children ``targets`` name, as ``(parent, attribute, qualified name,
    child)``; ValueError when nothing matches, when a match is not a dense ``nn.Linear``, or when
    it is partitioned by ZeRO-3 (``why_whole``: why the surgery needs the whole weight)."""
    found = _targeted_children(model, targets)
    if not found:
        existing = _linear_leaf_names(model)[:_MAX_NAMES_LISTED]
        raise ValueError(
            f"target_modules={sorted(targets)} matched no module of {type(model).__name__}; "
            f"module names that exist include {existing}."
        )
    for _, _, qualified, child in found:
        if not isinstance(child, nn.Linear):
            raise ValueError(
                f"module {qualified!r} matched target_modules but is a {type(child).__name__}, "
                "not an nn.Linear; remove its name from target_modules."
            )
        if hasattr(child.weight, "ds_shape"):
            raise ValueError(
                f"module {qualified!r} is partitioned by DeepSpeed ZeRO-3 (built under "
                f"deepspeed.zero.Init): {why_whole}"
            )
    return found


def target_set(target_modules: Iterable[str], *, purpose: str) -> frozenset[str]:
    """``target_modules`` as a set (a single name counts as one); ValueError when empty
    (``purpose``: what the surgery does to the layers, for the message)."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = frozenset(target_modules)
    if not targets:
        raise ValueError(
            f"target_modules=() is empty; name the layers to {purpose}, e.g. 'q_proj'."
        )
    return targets


def replace_matched(
    found: list[tuple[nn.Module, str, str, nn.Linear]],
    build: Callable[[str, nn.Linear], nn.Module],
) -> None:
    """Swap every matched child (as :func:`matched_linears` lists them) for
    ``build(qualified name, child)``."""
    # Build every replacement before swapping any, so a failure leaves the model untouched. A
    # Linear shared by several parents is built once, so the sharing survives.
    built: dict[int, nn.Module] = {}
    for _, _, qualified, child in found:
        if id(child) not in built:
            built[id(child)] = build(qualified, child)
    for parent, name, _, child in found:
        setattr(parent, name, built[id(child)])


def apply_weight_norm(
    model: nn.Module,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    detach_norm: bool = False,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` child whose attribute name is in ``target_modules``
    by a :class:`WeightNormLinear` that computes the same function, and return ``model``.

    Full mode (``lora_rank=None``): each layer trains a direction ``V`` and a magnitude ``m``.
    LoRA mode (``lora_rank=r``, ``lora_alpha`` defaults to ``r`` so the scaling is 1): each layer
    trains ``lora_A``, ``lora_B`` and the magnitude on top of a frozen copy of its weight.
    Nothing else is frozen here: in LoRA mode what trains is the adapters, the magnitudes, and
    whatever parameters the caller leaves with ``requires_grad=True`` (freeze the rest yourself,
    e.g. ``for p in model.parameters(): p.requires_grad_(False)`` BEFORE calling this; the new
    adapters and magnitudes are created trainable).

    Raises ``ValueError`` if nothing matches, if a matched module is not a dense ``nn.Linear``,
    if ``lora_rank`` is not in ``[1, min(out, in)]`` for every matched layer, or if the model
    already holds ``WeightNormLinear`` layers, or if ``model`` is (or contains) a PEFT model: PEFT
    LoRA/DoRA adapters are trained through ``projected_param_groups(peft_model)`` instead. All
    checks run before any layer is replaced.
    """
    targets = target_set(target_modules, purpose="normalise")
    _refuse_peft_or_weight_normed(model)
    found = matched_linears(
        model,
        targets,
        "weight normalisation needs whole weights. Build or load the model without zero.Init, "
        "call apply_weight_norm, then deepspeed.initialize (it partitions the result), or train "
        "GaLore (no weight norm) on the partitioned model.",
    )
    _check_lora_options(lora_rank, lora_alpha, found)
    replace_matched(
        found,
        lambda _, child: WeightNormLinear.from_linear(
            child, lora_rank=lora_rank, lora_alpha=lora_alpha, detach_norm=detach_norm
        ),
    )
    return model


def _refuse_peft_or_weight_normed(model: nn.Module) -> None:
    """A ValueError for a PEFT model and for one that already holds WeightNormLinear layers."""
    if is_peft_model(model):
        # PEFT's LoRA layers wrap the nn.Linear (base_layer + lora_A/lora_B dicts): swapping them
        # would drop the adapters, and weight-normalising the base under them is not DoRA.
        peft_layers = [n for n, m in model.named_modules() if is_peft_lora_layer(m)][:3]
        raise ValueError(
            f"apply_weight_norm got a PEFT model ({type(model).__name__}; PEFT LoRA layers "
            f"{peft_layers}). {PEFT_ROUTE}."
        )
    already = [name for name, m in model.named_modules() if isinstance(m, WeightNormLinear)]
    if already:
        raise ValueError(
            f"model already has WeightNormLinear layers ({already[:3]}...); apply_weight_norm "
            "was called twice. Call merge_weight_norm(model) first to start over."
        )


def _check_lora_options(
    lora_rank: int | None,
    lora_alpha: float | None,
    found: list[tuple[nn.Module, str, str, nn.Linear]],
) -> None:
    """A ValueError for ``lora_alpha`` without ``lora_rank``, a rank that is not a positive int
    or exceeds the smallest matched layer, and ``lora_alpha <= 0``."""
    if lora_rank is None and lora_alpha is not None:
        raise ValueError(f"lora_alpha={lora_alpha!r} given without lora_rank; set lora_rank.")
    if lora_rank is None:
        return
    smallest = min(min(c.in_features, c.out_features) for *_, c in found)
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, numbers.Integral) or lora_rank <= 0:
        raise ValueError(f"lora_rank={lora_rank!r} must be a positive int (or None).")
    if lora_rank > smallest:
        raise ValueError(
            f"lora_rank={lora_rank} exceeds min(out_features, in_features)={smallest} of the "
            "smallest targeted layer; use a smaller rank."
        )
    if lora_alpha is not None and not lora_alpha > 0:
        raise ValueError(f"lora_alpha={lora_alpha!r} must be > 0.")


def merge_weight_norm(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`WeightNormLinear` in ``model`` by a plain ``nn.Linear``
    holding the merged weight ``diag(m) · V / ||V||_row`` (and the bias); return ``model``.

    The result has the original architecture, so ``save_pretrained`` writes a checkpoint that
    stock ``transformers`` loads. A bare ``WeightNormLinear`` is returned as a new
    ``nn.Linear`` (it cannot be replaced in place). A model without ``WeightNormLinear`` layers is returned as is.
    """
    if isinstance(model, WeightNormLinear):
        return model.to_linear()  # the caller still holds the layer: its parameters stay live
    to_merge = [
        (parent, name, child)
        for _, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, WeightNormLinear)
    ]
    merged: dict[int, nn.Linear] = {}
    for parent, name, child in to_merge:
        if id(child) not in merged:
            merged[id(child)] = child.to_linear()
            _MERGED_AWAY.update({id(p): p for p in child.parameters()})
        setattr(parent, name, merged[id(child)])
    return model
