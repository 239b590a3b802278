"""How each compared method builds its model and optimizer, one small function per method.

Every method starts from the same freshly initialised model (same seed, same weights) and the
same targets: the attention and MLP projections (:data:`DEFAULT_TARGET_MODULES`). What differs:

- ``adamw``: ``torch.optim.AdamW`` on every parameter;
- ``adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` on every parameter (its CPU kernels);
- ``galore``: :class:`GradNormLoRPAdamW` on the plain model, targets projected (weight norm off);
- ``galore-torch``: ``galore_torch.GaLoreAdamW`` with exactly ``galore``'s groups and settings;
- ``lora`` / ``dora``: PEFT adapters (``LoraConfig``, ``use_dora`` False/True) on the targets,
  base target weights frozen; every other parameter (embeddings, ``lm_head``, norms) trains in
  full, as it does in every projected method, so only the targeted matrices differ;
- ``wegeft``: :func:`apply_wegeft` (per-layer generators of rank ``lora_rank``, scaling
  ``lora_alpha / lora_rank``) on the targets, base target weights frozen, every other parameter
  trains in full as for ``lora``; ``torch.optim.AdamW`` at AdamW's lr;
- ``gradnormlorp`` / ``gradnormlorp8bit``: :func:`apply_weight_norm` then
  :class:`GradNormLoRPAdamW` (``bits=8``: block-wise 8-bit moments);
- the granular methods (VLoRP, arXiv 2505.01744; docs/vlorp.md), :class:`GradNormLoRPAdamW` at
  granularity ``c`` and rank ``r`` (``Hyper.granularity``, ``Hyper.vlorp_rank``), recipe lr,
  gap and scale: ``vlorp`` (plain model, as ``galore``; ``proj_type="random"``, Gaussian bases),
  ``vlorp-projfactor`` (the same with ``second_moment="factored"``, ProjFactor) and
  ``gradnormlorp-granular`` (weight-normed model, as ``gradnormlorp``; SVD bases on the right,
  ``proj_type="right"``).

All use betas (0.9, 0.999) and eps 1e-6 (GaLore's defaults).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig

from gnlorp_dist.bench.config import METHODS, Hyper
from gnlorp_dist.models import build_model
from gnlorp_dist.nn import DEFAULT_TARGET_MODULES, apply_weight_norm
from gnlorp_dist.nn.wegeft import apply_wegeft
from gnlorp_dist.optim import GradNormLoRPAdamW, projected_param_groups

BETAS = (0.9, 0.999)
EPS = 1e-6
# galore-torch keeps its basis inside a GaLoreProjector object, ours under this state key.
_PROJ_KEY = "proj"
_GALORE_TORCH_PROJECTOR_KEY = "projector"


@dataclass(kw_only=True)
class MethodSetup:
    """A method's model (what the training step calls) and its optimizer."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    peak_lr: float
    """The lr the schedule scales (recipe lr for projected methods, AdamW's otherwise)."""
    trainable_parameters: int
    """Trainable parameter elements (adapters and dense parameters for lora/dora)."""


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(params: Any, lr: float, hp: Hyper) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=hp.weight_decay)


def _projected_groups(model: nn.Module, hp: Hyper) -> list[dict[str, Any]]:
    return projected_param_groups(
        model, hp.rank, hp.update_proj_gap, hp.scale, hp.proj_type, DEFAULT_TARGET_MODULES
    )


def build_adamw(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    return model, _adamw(_trainable(model), hp.adamw_lr, hp), hp.adamw_lr


def build_adamw8bit(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit(
        _trainable(model), lr=hp.adamw_lr, betas=BETAS, eps=EPS, weight_decay=hp.weight_decay
    )
    return model, optimizer, hp.adamw_lr


def build_galore(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    optimizer = GradNormLoRPAdamW(
        _projected_groups(model, hp), lr=hp.lr, betas=BETAS, eps=EPS, weight_decay=hp.weight_decay
    )
    return model, optimizer, hp.lr


def build_galore_torch(
    model: nn.Module, hp: Hyper
) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    from galore_torch import GaLoreAdamW

    # The very groups ``galore`` gets; galore-torch passes unknown keys (param_names) through.
    groups = _projected_groups(model, hp)
    kwargs = dict(lr=hp.lr, betas=BETAS, eps=EPS, weight_decay=hp.weight_decay)
    if hp.galore_torch_dense == "galore":
        return model, GaLoreAdamW(groups, no_deprecation_warning=True, **kwargs), hp.lr
    return model, _galore_torch_with_torch_dense(groups, kwargs), hp.lr


def _galore_torch_with_torch_dense(
    groups: list[dict[str, Any]], kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """``galore_torch.GaLoreAdamW`` on the projected groups, ``torch.optim.AdamW`` on the others.

    Why: GaLoreAdamW steps groups without ``rank`` with the Hugging Face AdamW convention
    (``denom = sqrt(v) + eps``, bias corrections in the step size), while our optimizer's dense
    groups are ``torch.optim.AdamW`` (``denom = sqrt(v / bc2) + eps``). With eps 1e-6 the two
    differ visibly on embedding rows with tiny gradients, which would hide what the comparison
    checks: that the projected update reproduces the reference package.
    """
    from galore_torch import GaLoreAdamW

    class GaLoreTorchAdamW(GaLoreAdamW):
        def __init__(self) -> None:
            super().__init__(groups, no_deprecation_warning=True, **kwargs)
            self.dense_groups = [g for g in self.param_groups if "rank" not in g]
            self.dense = torch.optim.AdamW(
                [{"params": g["params"]} for g in self.dense_groups], foreach=False, **kwargs
            )
            self.dense.state = self.state  # one state table: bytes are counted in one place

        def step(self, closure: Any = None) -> Any:
            every = self.param_groups
            self.param_groups = [g for g in every if "rank" in g]
            try:
                loss = super().step(closure)
            finally:
                self.param_groups = every
            for outer, inner in zip(self.dense_groups, self.dense.param_groups):
                inner["lr"], inner["weight_decay"] = outer["lr"], outer["weight_decay"]
            self.dense.step()
            return loss

    return GaLoreTorchAdamW()


def _peft_model(model: nn.Module, hp: Hyper, use_dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(DEFAULT_TARGET_MODULES),
        use_dora=use_dora,
        bias="none",
    )
    with warnings.catch_warnings():
        # PEFT probes a transformers attribute deprecated in v5 (a FutureWarning); not ours.
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    # PEFT freezes everything but the adapters. The projected methods train embeddings, lm_head
    # and norms in full; so do these, so that only the targeted matrices are treated differently.
    for name, param in peft_model.named_parameters():
        if "lora_" not in name and ".base_layer." not in name:
            param.requires_grad_(True)
    return peft_model


def build_lora(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    peft_model = _peft_model(model, hp, use_dora=False)
    return peft_model, _adamw(_trainable(peft_model), hp.adamw_lr, hp), hp.adamw_lr


def build_dora(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    peft_model = _peft_model(model, hp, use_dora=True)
    return peft_model, _adamw(_trainable(peft_model), hp.adamw_lr, hp), hp.adamw_lr


def build_wegeft(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    # Only the wrapped layers' weights are frozen (by apply_wegeft): embeddings, lm_head and
    # norms train in full, as they do for lora/dora and the projected methods.
    apply_wegeft(model, DEFAULT_TARGET_MODULES, rank=hp.lora_rank, alpha=hp.lora_alpha)
    return model, _adamw(_trainable(model), hp.adamw_lr, hp), hp.adamw_lr


def _gradnormlorp(model: nn.Module, hp: Hyper, bits: int) -> GradNormLoRPAdamW:
    apply_weight_norm(model, target_modules=DEFAULT_TARGET_MODULES)
    return GradNormLoRPAdamW(
        _projected_groups(model, hp),
        lr=hp.lr,
        betas=BETAS,
        eps=EPS,
        weight_decay=hp.weight_decay,
        bits=bits,
    )


def build_gradnormlorp(
    model: nn.Module, hp: Hyper
) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    return model, _gradnormlorp(model, hp, bits=32), hp.lr


def build_gradnormlorp8bit(
    model: nn.Module, hp: Hyper
) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    return model, _gradnormlorp(model, hp, bits=8), hp.lr


def _granular_groups(model: nn.Module, hp: Hyper, proj_type: str, **options: Any) -> list[dict]:
    return projected_param_groups(
        model,
        hp.vlorp_rank,
        hp.update_proj_gap,
        hp.scale,
        proj_type,
        DEFAULT_TARGET_MODULES,
        granularity=hp.granularity,
        **options,
    )


def _granular(model: nn.Module, hp: Hyper, proj_type: str, **options: Any) -> GradNormLoRPAdamW:
    groups = _granular_groups(model, hp, proj_type, **options)
    return GradNormLoRPAdamW(groups, lr=hp.lr, betas=BETAS, eps=EPS, weight_decay=hp.weight_decay)


def build_vlorp(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    return model, _granular(model, hp, "random"), hp.lr


def build_vlorp_projfactor(
    model: nn.Module, hp: Hyper
) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    return model, _granular(model, hp, "random", second_moment="factored"), hp.lr


def build_gradnormlorp_granular(
    model: nn.Module, hp: Hyper
) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    apply_weight_norm(model, target_modules=DEFAULT_TARGET_MODULES)
    return model, _granular(model, hp, "right"), hp.lr


BUILDERS: dict[str, Callable[[nn.Module, Hyper], tuple[nn.Module, torch.optim.Optimizer, float]]]
BUILDERS = {
    "adamw": build_adamw,
    "adamw8bit": build_adamw8bit,
    "galore": build_galore,
    "galore-torch": build_galore_torch,
    "lora": build_lora,
    "dora": build_dora,
    "wegeft": build_wegeft,
    "gradnormlorp": build_gradnormlorp,
    "gradnormlorp8bit": build_gradnormlorp8bit,
    "vlorp": build_vlorp,
    "vlorp-projfactor": build_vlorp_projfactor,
    "gradnormlorp-granular": build_gradnormlorp_granular,
}
assert tuple(BUILDERS) == METHODS


def build_method(
    method: str,
    llama: LlamaConfig,
    hp: Hyper,
    seed: int,
    device: torch.device | str = "cpu",
) -> MethodSetup:
    """``method``'s model (fresh from ``seed``) and optimizer on ``device``; ValueError for an
    unknown name."""
    if method not in BUILDERS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    # Initialised on the CPU, then moved: the same weights on every device for the same seed,
    # and the optimizer (built next) sees the parameters where they train.
    model = build_model(llama, dtype=torch.float32, seed=seed).to(device)
    # Adapter initialisation (LoRA's A) draws from the global generator: same seed, same draw.
    torch.manual_seed(seed)
    model, optimizer, peak_lr = BUILDERS[method](model, hp)
    return MethodSetup(
        method=method,
        model=model,
        optimizer=optimizer,
        peak_lr=peak_lr,
        trainable_parameters=sum(p.numel() for p in _trainable(model)),
    )


def missing_dependency(method: str) -> str | None:
    """The pip package ``method`` needs and cannot import, or None."""
    module, package = {
        "adamw8bit": ("bitsandbytes", "bitsandbytes"),
        "galore-torch": ("galore_torch", "galore-torch==1.0"),
        "lora": ("peft", "peft"),
        "dora": ("peft", "peft"),
    }.get(method, (None, None))
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return package
    return None


def _storages(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    basis = getattr(value, "ortho_matrix", None)  # a galore-torch GaLoreProjector
    if basis is None:
        return []
    return [b for b in (basis if isinstance(basis, (list, tuple)) else [basis]) if b is not None]


def state_bytes(optimizer: torch.optim.Optimizer, params: set[int] | None = None) -> dict[str, int]:
    """Exact bytes of the optimizer's state tensors: ``total`` (each storage once; a shared
    tensor such as bitsandbytes' quantisation map counts once), of which ``projection`` (the
    projection matrices: our ``state["proj"]``, galore-torch's projector basis, whose storage
    is the whole SVD factor it was sliced from). Python numbers (step counters of the projected
    optimizers) hold no tensor memory and count 0. ``params``: only the states of the
    parameters with these ``id``s."""
    seen: dict[int, int] = {}
    projection = 0
    for param, state in optimizer.state.items():
        if params is not None and id(param) not in params:
            continue
        for key, value in state.items():
            for tensor in _storages(value):
                storage = tensor.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen[storage.data_ptr()] = storage.nbytes()
                if key in (_PROJ_KEY, _GALORE_TORCH_PROJECTOR_KEY):
                    projection += storage.nbytes()
    return {"total": sum(seen.values()), "projection": projection}


def expose_projection_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[dict, str]]:
    """Alias galore-torch's projector bases as ``state["proj"]`` tensors so that the live-tensor
    tracker (which counts tensors in ``optimizer.state``) sees them; returns what to undo."""
    added = []
    for state in optimizer.state.values():
        projector = state.get(_GALORE_TORCH_PROJECTOR_KEY)
        if projector is not None and _PROJ_KEY not in state:
            bases = _storages(projector)
            if bases:
                state[_PROJ_KEY] = bases[0]
                added.append((state, _PROJ_KEY))
    return added


def target_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes (projections included) of the parameters inside the targeted
    modules: full weights, directions and magnitudes, or adapters. In a small model with a 32k
    vocabulary the embeddings and ``lm_head`` dominate the total; this is where methods differ."""
    targets = set(DEFAULT_TARGET_MODULES)
    inside = {id(p) for n, p in model.named_parameters() if targets & set(n.split("."))}
    return state_bytes(optimizer, inside)["total"]
