"""WeGeFT: weight-generative fine-tuning (Savadikar, Song & Wu, ICML 2025, arXiv 2312.00700;
first published as GIFT).

The fine-tuning update of a frozen linear weight ``W0`` (shape ``(out, in)``) is GENERATED from
``W0`` itself by two small linear maps ``phi`` and ``psi`` (both of shape ``(r, in)``):

    ΔW = s · (W0 φᵀ) ψ          W = W0 + ΔW,          s = alpha / r

i.e. ``phi`` compresses every row of ``W0`` to ``r`` numbers and ``psi`` maps them back to the
input dimension. This is the "input" form of the authors' PEFT tuner (``WeGeFTLayer``:
``get_delta_weight`` computes ``(weight @ phi.t()) @ psi * scaling``, the forward adds
``F.linear(psi(x), phi(weight)) * scaling``): ``phi`` starts at zero and ``psi`` with
``nn.Linear``'s default (Kaiming-uniform, ``a = sqrt(5)``), so ``ΔW = 0`` at initialisation and
the wrapped model computes exactly what the pre-trained one did; ``s = alpha / r``.

Because ``phi`` and ``psi`` only see the INPUT dimension, one pair can serve every layer that
shares ``in_features``. Two variants:

- per layer (``shared=False``): every wrapped layer owns its ``(phi, psi)``: ``2·r·in``
  trainable parameters per layer, LoRA's ``r·(in + out)`` for square layers;
- shared across layers (``shared=True``, the authors' ``tied_modules`` setting of their LLaMA
  runs, where ``model.layers.\\d+.self_attn.q_proj`` is one tied group): the same projection in
  every transformer block (qualified names equal once the block indices are masked, e.g.
  ``layers.*.self_attn.q_proj``) uses ONE ``(phi, psi)``: ``2·r·in`` parameters per group,
  independent of the depth.

Forward cost: ``W0 φᵀ`` (``out·in·r`` multiply-adds per step, like LoRA's ``BA`` product) and
two rank-``r`` products of the activations; nothing weight-sized is stored besides ``W0``.
:func:`merge_wegeft` folds ``ΔW`` into a plain ``nn.Linear`` (computed in float64, then cast
to ``W0``'s dtype), so inference costs nothing extra.

The math lives in the pure functions below; :class:`WeGeFTLinear` only holds parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gnlorp_dist.nn.surgery import (
    DEFAULT_TARGET_MODULES,
    is_peft_model,
    matched_linears,
    replace_matched,
    target_set,
)
from gnlorp_dist.nn.weight_norm import plain_linear

# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def generated_delta(
    base_weight_OI: torch.Tensor,
    phi_RI: torch.Tensor,
    psi_RI: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The generated update ``ΔW = s · (W0 φᵀ) ψ`` (shape ``(out, in)``), in ``W0``'s dtype."""
    generated_OR = F.linear(base_weight_OI, phi_RI.to(base_weight_OI.dtype))
    return scaling * (generated_OR @ psi_RI.to(base_weight_OI.dtype))


def wegeft_linear(
    x: torch.Tensor,
    base_weight_OI: torch.Tensor,
    phi_RI: torch.Tensor,
    psi_RI: torch.Tensor,
    bias_O: torch.Tensor | None = None,
    *,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``y = x W0ᵀ + b + s · (x ψᵀ) (W0 φᵀ)ᵀ = x (W0 + ΔW)ᵀ + b`` without forming ``ΔW``.

    ``dropout`` (the authors' ``wegeft_dropout``) drops entries of ``W0`` before it is fed to
    the generator, in training only; the base term always uses the whole ``W0``.
    """
    out = F.linear(x, base_weight_OI, bias_O)
    source_OI = F.dropout(base_weight_OI, dropout, training) if dropout else base_weight_OI
    generated_OR = F.linear(source_OI, phi_RI.to(source_OI.dtype))
    delta = F.linear(F.linear(x, psi_RI.to(x.dtype)), generated_OR.to(x.dtype))
    return out + scaling * delta


def merge_wegeft_weight(
    base_weight_OI: torch.Tensor,
    phi_RI: torch.Tensor,
    psi_RI: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``W0 + s · (W0 φᵀ) ψ`` computed in float64 and returned in ``W0``'s dtype."""
    acc = torch.float64
    base64_OI = base_weight_OI.to(acc)
    merged = base64_OI + generated_delta(base64_OI, phi_RI.to(acc), psi_RI.to(acc), scaling)
    return merged.to(base_weight_OI.dtype)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class WeGeFTGenerator(nn.Module):
    """The trainable pair ``(phi, psi)``, both ``(rank, in_features)``, that generates ``ΔW``
    from a frozen weight; one instance is shared by every layer of a tied group."""

    def __init__(
        self,
        in_features: int,
        rank: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.rank = rank
        self.phi = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.psi = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``phi = 0`` (so ``ΔW = 0``), ``psi`` as ``nn.Linear``'s default weight init."""
        nn.init.zeros_(self.phi)
        nn.init.kaiming_uniform_(self.psi, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}"


class WeGeFTLinear(nn.Module):
    """``nn.Linear`` whose frozen weight ``W0`` is adapted by a generated update
    ``ΔW = s · (W0 φᵀ) ψ`` (see the module docstring).

    ``weight`` and ``bias`` are the wrapped layer's own (frozen) parameters; the trainable ones
    live in ``generator``, which several layers may share.
    """

    def __init__(
        self,
        base: nn.Linear,
        generator: WeGeFTGenerator,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if generator.in_features != base.in_features:
            raise ValueError(
                f"generator in_features={generator.in_features} does not match the layer's "
                f"in_features={base.in_features}"
            )
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.generator = generator
        self.alpha = float(alpha) if alpha is not None else float(generator.rank)
        self.dropout = float(dropout)

    @property
    def rank(self) -> int:
        return self.generator.rank

    @property
    def scaling(self) -> float:
        return self.alpha / self.generator.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wegeft_linear(
            x,
            self.weight,
            self.generator.phi,
            self.generator.psi,
            self.bias,
            scaling=self.scaling,
            dropout=self.dropout,
            training=self.training,
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W0 + ΔW`` (out, in), in ``W0``'s dtype, without grad."""
        return merge_wegeft_weight(
            self.weight, self.generator.phi, self.generator.psi, self.scaling
        )

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (same dtype and device); its
        weight is frozen, as ``W0`` was, and its bias keeps the bias's ``requires_grad``."""
        return plain_linear(self.merged_weight(), self.bias, weight_trainable=False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}"
        )


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------


def share_key(qualified_name: str) -> str:
    """The tied group of a layer in the shared variant: its qualified name with every block
    index masked (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``)."""
    return ".".join("*" if part.isdigit() else part for part in qualified_name.split("."))


def apply_wegeft(
    model: nn.Module,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    rank: int = 8,
    alpha: float | None = None,
    shared: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` child whose attribute name is in
    ``target_modules`` by a :class:`WeGeFTLinear` (same function at initialisation: ``ΔW = 0``)
    and return ``model``.

    ``rank`` r and ``alpha`` (default r, so ``s = 1``) set ``ΔW = (alpha / r) · (W0 φᵀ) ψ``.
    ``shared=False``: one generator per layer; ``shared=True``: one per tied group (same
    :func:`share_key` and ``in_features``), i.e. per projection type across the blocks.
    ``dropout``: dropout on ``W0`` inside the generator during training.

    The wrapped layers' weights and biases are frozen; nothing else is: freeze the rest of the
    model yourself (e.g. ``model.requires_grad_(False)`` BEFORE calling this; the generators are
    created trainable).

    Raises ``ValueError`` if nothing matches, if a matched module is not a dense ``nn.Linear``
    (a ``WeightNormLinear`` or an already wrapped layer included), if ``rank`` is not in
    ``[1, in_features]`` for every matched layer, if ``alpha <= 0`` or ``dropout`` is not in
    ``[0, 1)``, or if ``model`` is (or contains) a PEFT model. All checks run before any layer
    is replaced.
    """
    targets = target_set(target_modules, purpose="adapt")
    _check_wegeft_options(rank, alpha, dropout)
    _refuse_peft_or_wrapped(model)
    found = matched_linears(
        model,
        targets,
        "WeGeFT generates its update from the whole weight. Build the model without zero.Init "
        "first.",
    )
    smallest = min(c.in_features for *_, c in found)
    if rank > smallest:
        raise ValueError(
            f"rank={rank} exceeds in_features={smallest} of the smallest targeted layer; use a "
            "smaller rank."
        )
    generators: dict[object, WeGeFTGenerator] = {}

    def wrap(qualified: str, child: nn.Linear) -> WeGeFTLinear:
        key = (share_key(qualified), child.in_features) if shared else qualified
        if key not in generators:
            generators[key] = WeGeFTGenerator(
                child.in_features, rank, device=child.weight.device, dtype=child.weight.dtype
            )
        return WeGeFTLinear(child, generators[key], alpha=alpha, dropout=dropout)

    replace_matched(found, wrap)
    return model


def _check_wegeft_options(rank: int, alpha: float | None, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"rank={rank!r} must be a positive int.")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1).")


def _refuse_peft_or_wrapped(model: nn.Module) -> None:
    """A ValueError for a PEFT model and for one that already holds WeGeFTLinear layers."""
    if is_peft_model(model):
        raise ValueError(
            f"apply_wegeft got a PEFT model ({type(model).__name__}); apply it to the plain model."
        )
    already = [name for name, m in model.named_modules() if isinstance(m, WeGeFTLinear)]
    if already:
        raise ValueError(
            f"model already has WeGeFTLinear layers ({already[:3]}...); apply_wegeft was called "
            "twice. Call merge_wegeft(model) first to start over."
        )


def wegeft_generators(model: nn.Module) -> list[WeGeFTGenerator]:
    """Every distinct generator of ``model`` (a shared one once), in module order."""
    seen: dict[int, WeGeFTGenerator] = {}
    for module in model.modules():
        if isinstance(module, WeGeFTLinear):
            seen.setdefault(id(module.generator), module.generator)
    return list(seen.values())


def merge_wegeft(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`WeGeFTLinear` of ``model`` by a plain ``nn.Linear``
    holding ``W0 + ΔW`` (and the bias); return ``model``.

    The result has the original architecture, so ``save_pretrained`` writes a checkpoint that
    stock ``transformers`` loads. A bare ``WeGeFTLinear`` is returned as a new ``nn.Linear``.
    A model without ``WeGeFTLinear`` layers is returned as is.
    """
    if isinstance(model, WeGeFTLinear):
        return model.to_linear()
    to_merge = [
        (parent, name, child)
        for _, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, WeGeFTLinear)
    ]
    merged: dict[int, nn.Linear] = {}
    for parent, name, child in to_merge:
        if id(child) not in merged:
            merged[id(child)] = child.to_linear()
        setattr(parent, name, merged[id(child)])
    return model
