"""Split a model's parameters into the projected group and the dense group."""

from __future__ import annotations

from typing import Any

from torch import nn

from gnlorp_dist.nn import DEFAULT_TARGET_MODULES, WeightNormLinear


def projected_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str = "std",
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGET_MODULES,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`GradNormLoRPAdamW` (GaLore's keys), with ``param_names``.

    Projected: the matrices that :meth:`WeightNormLinear.projected_parameters` names (the
    direction ``V`` in full mode, ``lora_A``/``lora_B`` in LoRA mode), and the ``weight`` of every
    plain ``nn.Linear`` whose attribute name is in ``target_modules`` (GaLore, weight-norm off).
    Dense: every other trainable parameter (magnitudes, norms, embeddings, ``lm_head``, biases).
    Frozen parameters are left out.
    """
    projected: dict[int, str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, WeightNormLinear):
            for param in module.projected_parameters():
                projected[id(param)] = module_name
        elif isinstance(module, nn.Linear) and module_name.rsplit(".", 1)[-1] in target_modules:
            projected[id(module.weight)] = module_name
    if not projected:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise ValueError(
            f"no parameter matched target_modules={tuple(target_modules)}; linear layers in this "
            f"model include {linear_names}. Pass target_modules naming them."
        )

    projected_params, projected_names, dense_params, dense_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in projected:
            projected_params.append(param)
            projected_names.append(name)
        else:
            dense_params.append(param)
            dense_names.append(name)
    groups: list[dict[str, Any]] = [
        {
            "params": projected_params,
            "param_names": projected_names,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
        }
    ]
    if dense_params:
        groups.append({"params": dense_params, "param_names": dense_names})
    return groups
