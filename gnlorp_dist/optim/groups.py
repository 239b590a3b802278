"""Split a model's parameters into the projected group and the dense group."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from gnlorp_dist.nn import DEFAULT_TARGET_MODULES, WeightNormLinear
from gnlorp_dist.nn.surgery import is_peft_lora_layer, is_peft_model


def target_matches(qualified_name: str, target: str) -> bool:
    """Whether module ``qualified_name`` is named by ``target``.

    It is when some run of its dotted components, starting anywhere and ending anywhere, equals
    ``target`` or matches it as an fnmatch glob (``*`` also crosses dots). So ``"q_proj"`` names
    ``model.layers.0.self_attn.q_proj`` and also everything inside it (PEFT's
    ``q_proj.lora_A.default``); ``"self_attn.q_proj"``, ``"layers.*.q_proj"`` and
    ``"*.lora_A.*"`` work as written.
    """
    components = qualified_name.split(".")
    for end in range(1, len(components) + 1):
        prefix = ".".join(components[:end])
        # "*." + target lets the run start after any dot; the bare target lets it start at 0.
        if fnmatchcase(prefix, target) or fnmatchcase(prefix, "*." + target):
            return True
    return False


def _peft_lora_factors(model: nn.Module) -> dict[int, str]:
    """``{id(weight): module name}`` of every ``lora_A``/``lora_B`` linear of every adapter."""
    factors: dict[int, str] = {}
    for module_name, module in model.named_modules():
        if not is_peft_lora_layer(module):
            continue
        for factor_dict in ("lora_A", "lora_B"):
            for adapter, factor in getattr(module, factor_dict).items():
                # Conv LoRA factors are 4-D: the projector takes matrices only, so they go dense.
                if isinstance(factor, nn.Linear):
                    factors[id(factor.weight)] = f"{module_name}.{factor_dict}.{adapter}"
    return factors


def _check_lora_factor_ranks(
    rank: int, named: Sequence[tuple[str, nn.Parameter]], lora_factor_ids: set[int]
) -> None:
    """Refuse a projection rank that reaches a LoRA factor's own rank ``r``.

    A factor is ``(r, in)`` or ``(out, r)``: projecting it onto ``rank >= r`` directions keeps
    the whole matrix (an ``r x r`` rotation), so it saves nothing and only adds SVDs. The group
    has one rank, so clamping per matrix would silently mean a different rank per factor;
    refusing names the fix instead (the optimizer itself only refuses ``rank > min(shape)``).
    """
    too_big = [
        (name, tuple(param.shape))
        for name, param in named
        if id(param) in lora_factor_ids and isinstance(rank, int) and rank >= min(param.shape)
    ]
    if too_big:
        smallest = min(min(shape) for _, shape in too_big)
        raise ValueError(
            f"rank={rank} is not below the LoRA rank of {len(too_big)} LoRA factor(s), e.g. "
            f"{too_big[0][0]} of shape {too_big[0][1]}: projecting an (r, in) or (out, r) factor "
            f"onto rank >= r keeps all of it and saves no memory. Pass rank < {smallest} (e.g. "
            f"rank={max(1, smallest // 2)}), or train the factors densely (plain AdamW)."
        )


PROJECTION_OPTIONS = (
    "proj_bits",
    "svd_method",
    "lazy_refresh_threshold",
    "max_update_proj_gap",
    "bits",
    "min_8bit_size",
    "granularity",
    "random_basis",
    "projection_seed",
    "second_moment",
)


def projected_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str = "std",
    target_modules: Sequence[str] | str | None = None,
    **projection_options: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`GradNormLoRPAdamW` (GaLore's keys), with ``param_names``.

    Projected: the matrices that :meth:`WeightNormLinear.projected_parameters` names (the
    direction ``V`` in full mode, ``lora_A``/``lora_B`` in LoRA mode), and the ``weight`` of every
    ``nn.Linear`` that ``target_modules`` names (see :func:`target_matches`: qualified names,
    dotted components, fnmatch globs such as ``"*.lora_A.*"`` or ``"layers.*.q_proj"``).
    Dense: every other trainable parameter (magnitudes, norms, embeddings, ``lm_head``, biases).
    Frozen parameters (``requires_grad=False``) are in no group.

    Default targets: on a plain model, :data:`DEFAULT_TARGET_MODULES` (the attention and MLP
    projections). On a PEFT model (``peft.PeftModel`` or a module holding PEFT LoRA layers), the
    ``lora_A`` and ``lora_B`` weights of every adapter; DoRA's ``lora_magnitude_vector`` is 1-D
    and goes to the dense group. A LoRA factor needs ``rank`` below its LoRA ``r``: ``rank >= r``
    is refused (it would project onto the whole factor).

    ``projection_options`` go into the projected group as they are (validated by the
    optimizer): ``proj_bits`` (None, 8, 4), ``svd_method`` (``"auto"``, ``"svd"``,
    ``"randomized"``), ``lazy_refresh_threshold``, ``max_update_proj_gap``, ``bits``,
    ``min_8bit_size``, and VLoRP's ``granularity``, ``random_basis`` (with
    ``proj_type="random"``), ``projection_seed`` and ``second_moment`` (``"adam"`` or ProjFactor's
    ``"factored"``): see docs/vlorp.md.
    """
    _check_projection_options(projection_options)
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    peft = is_peft_model(model)
    lora_factors = _peft_lora_factors(model) if peft else {}
    projected = _projected_matrices(model, target_modules, lora_factors if peft else None)
    projected_named, dense_named = _split_trainable(model, projected)
    if peft and not projected_named:
        raise _frozen_match_error(target_modules)
    _check_lora_factor_ranks(rank, projected_named, set(lora_factors))
    groups: list[dict[str, Any]] = [
        {
            "params": [param for _, param in projected_named],
            "param_names": [name for name, _ in projected_named],
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
            **projection_options,
        }
    ]
    if dense_named:
        groups.append(
            {
                "params": [param for _, param in dense_named],
                "param_names": [name for name, _ in dense_named],
            }
        )
    return groups


def _check_projection_options(options: dict[str, Any]) -> None:
    unknown = set(options) - set(PROJECTION_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown projection options {sorted(unknown)}; use {list(PROJECTION_OPTIONS)}"
        )


def _frozen_match_error(target_modules: Sequence[str] | None) -> ValueError:
    # PEFT freezes the base model: a match on frozen weights only would train no adapter.
    return ValueError(
        f"every matrix matched by target_modules={target_modules!r} on this PEFT model is "
        "frozen (requires_grad=False); leave target_modules unset to project the trainable "
        "lora_A/lora_B factors."
    )


def _projected_matrices(
    model: nn.Module, target_modules: Sequence[str] | None, lora_factors: dict[int, str] | None
) -> dict[int, str]:
    """``{id(weight): module name}`` of every matrix to project: the weight-normalized
    layers' projected parameters, then the LoRA factors of a PEFT model (``lora_factors``; None:
    not a PEFT model) when no target is named, else every ``nn.Linear`` a target names."""
    projected: dict[int, str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, WeightNormLinear):
            for param in module.projected_parameters():
                projected[id(param)] = module_name
    if target_modules is None and lora_factors is not None:
        projected.update(lora_factors)
    else:
        targets = tuple(DEFAULT_TARGET_MODULES if target_modules is None else target_modules)
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(
                target_matches(module_name, t) for t in targets
            ):
                projected.setdefault(id(module.weight), module_name)
    if not projected:
        raise _nothing_matched_error(model, target_modules, peft=lora_factors is not None)
    return projected


def _nothing_matched_error(
    model: nn.Module, target_modules: Sequence[str] | None, *, peft: bool
) -> ValueError:
    if peft and target_modules is None:
        return ValueError(
            f"{type(model).__name__} is a PEFT model without LoRA linear layers (no lora_A/"
            "lora_B nn.Linear); pass target_modules naming the matrices to project, e.g. "
            "target_modules=('*.lora_A.*', '*.lora_B.*')."
        )
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
    return ValueError(
        f"no parameter matched target_modules={tuple(target_modules or DEFAULT_TARGET_MODULES)}"
        f"; linear layers in this model include {linear_names}. Pass target_modules naming "
        "them (qualified names, dotted components or globs such as 'layers.*.q_proj')."
    )


def _split_trainable(
    model: nn.Module, projected: dict[int, str]
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(projected, dense)``: every trainable parameter with its name, in the model's order
    (frozen ones are in neither)."""
    projected_named, dense_named = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (projected_named if id(param) in projected else dense_named).append((name, param))
    return projected_named, dense_named
