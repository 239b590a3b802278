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

from gnlorp_dist.bench.config import METHODS, PROJECTED_METHODS, Hyper
from gnlorp_dist.memory.bytes import entry_tensors, optimizer_state_bytes
from gnlorp_dist.models import ModelSpec, build_model
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


GROUP_METHODS = ("adamw", "adamw8bit", "galore", "galore-torch", "gradnormlorp", "gradnormlorp8bit")
"""Methods that are an optimizer over parameter groups of the model (weight-normalised first
for the ``gradnormlorp`` ones): :func:`prepare_model`, :func:`param_groups` and
:func:`make_optimizer` build them one part at a time (the benchmark scripts measure the
parts)."""
_WEIGHT_NORMED = ("gradnormlorp", "gradnormlorp8bit")


REFERENCE_METHODS = ("adamw", "galore", "gradnormlorp", "galore-torch")
"""The four methods the scripts in ``benchmarks/`` compare (at :func:`spec_hyper`): AdamW,
GradNormLoRPAdamW as GaLore (plain model) and as GradNormLoRP (weight-normalised), and GaLore's
own package on ``galore``'s groups."""


def spec_hyper(spec: ModelSpec, lr: float = 1e-3) -> Hyper:
    """The settings the benchmark scripts compare methods at: the model spec's rank, gap and
    scale, one lr for every method, no weight decay, galore-torch on its own dense update."""
    return Hyper(
        lr=lr,
        adamw_lr=lr,
        rank=spec.rank,
        update_proj_gap=spec.update_proj_gap,
        scale=spec.scale,
        proj_type="std",
        galore_torch_dense="galore",
        lora_rank=spec.rank,
        lora_alpha=float(spec.rank),
        weight_decay=0.0,
    )


def _check_group_method(method: str) -> None:
    if method not in GROUP_METHODS:
        raise ValueError(f"method {method!r} is not a group method; use one of {GROUP_METHODS}")


def prepare_model(model: nn.Module, method: str) -> nn.Module:
    """``model`` as ``method`` trains it: weight-normalised (in place) for ``gradnormlorp``."""
    _check_group_method(method)
    if method in _WEIGHT_NORMED:
        apply_weight_norm(model, target_modules=DEFAULT_TARGET_MODULES)
    return model


def param_groups(model: nn.Module, method: str, hp: Hyper) -> list[dict[str, Any]]:
    """The groups ``method`` gives its optimizer: every trainable parameter in one (AdamW's),
    or the projected targets at ``hp``'s rank, gap and scale and the dense rest."""
    _check_group_method(method)
    if method in ("adamw", "adamw8bit"):
        return [{"params": _trainable(model)}]
    return _projected_groups(model, hp)


def make_optimizer(method: str, groups: list[dict[str, Any]], hp: Hyper) -> torch.optim.Optimizer:
    """``method``'s optimizer over ``groups`` (betas :data:`BETAS`, eps :data:`EPS`)."""
    _check_group_method(method)
    kwargs = dict(betas=BETAS, eps=EPS, weight_decay=hp.weight_decay)
    if method == "adamw":
        return _adamw(groups, hp.adamw_lr, hp)
    if method == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=hp.adamw_lr, **kwargs)
    if method == "galore-torch":
        from galore_torch import GaLoreAdamW

        # galore-torch passes unknown keys (param_names) through.
        if hp.galore_torch_dense == "galore":
            return GaLoreAdamW(groups, no_deprecation_warning=True, lr=hp.lr, **kwargs)
        return _galore_torch_with_torch_dense(groups, dict(lr=hp.lr, **kwargs))
    bits = 8 if method == "gradnormlorp8bit" else 32
    return GradNormLoRPAdamW(groups, lr=hp.lr, bits=bits, **kwargs)


def peak_lr(method: str, hp: Hyper) -> float:
    """The lr the schedule scales: the recipe lr for projected methods, AdamW's otherwise."""
    return hp.lr if method in PROJECTED_METHODS else hp.adamw_lr


def _group_builder(
    method: str,
) -> Callable[[nn.Module, Hyper], tuple[nn.Module, torch.optim.Optimizer, float]]:
    def build(model: nn.Module, hp: Hyper) -> tuple[nn.Module, torch.optim.Optimizer, float]:
        model = prepare_model(model, method)
        return (
            model,
            make_optimizer(method, param_groups(model, method, hp), hp),
            peak_lr(method, hp),
        )

    return build


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
    **{method: _group_builder(method) for method in GROUP_METHODS[:4]},
    "lora": build_lora,
    "dora": build_dora,
    "wegeft": build_wegeft,
    **{method: _group_builder(method) for method in GROUP_METHODS[4:]},
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


def state_bytes(optimizer: torch.optim.Optimizer, params: set[int] | None = None) -> dict[str, int]:
    """Exact bytes of the optimizer's state tensors: ``total`` (each storage once; a shared
    tensor such as bitsandbytes' quantisation map counts once), of which ``projection`` (the
    projection matrices: our ``state["proj"]``, galore-torch's projector basis, whose storage
    is the whole SVD factor it was sliced from). Python numbers (step counters of the projected
    optimizers) hold no tensor memory and count 0. ``params``: only the states of the
    parameters with these ``id``s. Priced by :func:`gnlorp_dist.memory.bytes.state_bytes`."""
    chosen = [p for p in optimizer.state if params is None or id(p) in params]
    counts = optimizer_state_bytes(optimizer, chosen, each_storage_once=True)
    return {"total": counts["total"], "projection": counts["projection"]}


def expose_projection_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[dict, str]]:
    """Alias galore-torch's projector bases as ``state["proj"]`` tensors so that the live-tensor
    tracker (which counts tensors in ``optimizer.state``) sees them; returns what to undo."""
    added = []
    for state in optimizer.state.values():
        projector = state.get(_GALORE_TORCH_PROJECTOR_KEY)
        if projector is not None and _PROJ_KEY not in state:
            bases = entry_tensors(projector)
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
