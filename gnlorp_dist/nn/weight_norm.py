"""Per-output-neuron weight normalisation of a linear layer (GradNormLoRP, design page section 1).

A linear layer ``y = x W^T + b`` with ``W`` of shape ``(out, in)`` is re-parametrised as

    W = diag(m) · V / ||V||_row

with a trainable magnitude ``m`` of shape ``(out,)`` and a direction ``V`` of shape ``(out, in)``.
The norm is taken per ROW of ``nn.Linear.weight`` (one per output neuron, PEFT DoRA's axis).

Two modes:

- full mode: ``V`` and ``m`` are the parameters;
- LoRA mode (the paper's eq. 9): ``V = W0 + s·B A`` with ``W0`` frozen, ``A`` of shape
  ``(r, in)``, ``B`` of shape ``(out, r)`` and ``s = lora_alpha / r``.

The math lives in the pure functions below; :class:`WeightNormLinear` only holds parameters.

Numerics:

- Row norms are computed in float32 (float64 for float64 weights) whatever the parameter
  dtype, so bf16 and fp16 weights work, and the per-row scale ``m / ||V||`` is formed in that
  precision before being cast to the output dtype.
- Norms are clamped below at ``eps`` (:data:`NORM_EPS` = 1e-12 by default), so a row whose
  direction is all zeros gives a zero output row and finite gradients instead of NaN. In fp16
  the scale is additionally clamped to the largest finite fp16 value, so ``m / eps`` cannot
  overflow to ``inf`` (``0 * inf`` would be NaN).
- In LoRA mode the row norm of ``W0 + s·B A`` is computed WITHOUT materialising that
  ``(out, in)`` matrix, from the expansion

      ||W0 + sBA||²_row = ||W0||²_row + 2s·rowsum((W0 Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B)

  whose only weight-sized operand is ``W0`` itself (autograd saves a reference to it, not a
  copy). Everything but the ``W0 Aᵀ`` product is evaluated in float32. The expansion loses
  accuracy only when the adapter nearly cancels a row of ``W0`` (relative error of the squared
  norm ~ float_eps · ||W0||² / ||W0 + sBA||²); the squared norm is clamped at ``eps²`` before
  the square root so rounding can never make it negative. Weight-norm training tends to GROW
  ``||V||`` (the true gradient of ``V`` is orthogonal to its rows), so that regime is rare; with
  a tenfold shrink the float32 error stays below 1e-4 (tested).
- ``magnitude`` is stored in the weight's dtype (as DoRA does); in bf16 its rounding makes the
  freshly wrapped layer equal to the original only to bf16 precision (exactly in fp32).
- fp16: the forward of a zero-norm row is finite, but its gradient (about ``m / eps``) can
  overflow; use bf16 or fp32 for training.

``WeightNormLinear`` has no ``weight`` attribute: ``transformers``' LLaMA attention (eager and
SDPA) and MLP code, the loss, gradient checkpointing, ``generate``, weight tying,
``init_weights`` and ``save_pretrained`` never read ``q_proj.weight`` and the like (read in
transformers 5.17, the GPU image's, and 5.23; tests/unit/test_weight_norm.py trips on any read
of it on the installed version). One known reader: flash-attention-2 with float32 queries and no
autocast looks up the dtype of the first ``nn.Linear`` inside the attention module; use bf16
weights (what flash attention needs anyway) or another attention implementation.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-12
"""Lower clamp of every row norm; keeps zero-norm rows finite."""


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The precision norms and scales are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def row_norm(weight_OI: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """L2 norm (float32, or float64 for float64 input) of every row of ``weight_OI`` (shape ``(out,)``), clamped at ``eps``.

    ``vector_norm(..., dtype=float32)`` reduces in float32 without an autograd-saved float32
    copy of the weight (it saves the weight itself), unlike ``weight.float().norm(...)``.
    """
    norm_O = torch.linalg.vector_norm(weight_OI, ord=2, dim=1, dtype=_acc(weight_OI.dtype))
    return norm_O.clamp_min(eps)


def lora_direction(
    base_weight_OI: torch.Tensor,
    lora_A_RI: torch.Tensor,
    lora_B_OR: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The LoRA-mode direction ``V = W0 + s·B A``, materialised (shape ``(out, in)``)."""
    return base_weight_OI + scaling * (lora_B_OR @ lora_A_RI)


def lora_row_norm(
    base_weight_OI: torch.Tensor,
    lora_A_RI: torch.Tensor,
    lora_B_OR: torch.Tensor,
    scaling: float,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """Row norm (as :func:`row_norm`) of ``W0 + s·B A`` without forming that matrix (see the module docstring)."""
    acc = _acc(base_weight_OI.dtype)
    base_sq_O = row_norm(base_weight_OI, eps=0.0).square()
    A32_RI = lora_A_RI.to(acc)
    B32_OR = lora_B_OR.to(acc)
    # W0 Aᵀ in the weights' dtype: upcasting W0 would create (and save) a float32 copy of it.
    base_A_OR = F.linear(base_weight_OI, lora_A_RI.to(base_weight_OI.dtype)).to(acc)
    cross_O = (base_A_OR * B32_OR).sum(dim=1)
    quad_O = ((B32_OR @ (A32_RI @ A32_RI.T)) * B32_OR).sum(dim=1)
    norm_sq_O = base_sq_O + (2.0 * scaling) * cross_O + (scaling * scaling) * quad_O
    return norm_sq_O.clamp_min(eps * eps).sqrt()


def _scale_for(
    magnitude_O: torch.Tensor, norm_O: torch.Tensor, dtype: torch.dtype, detach_norm: bool
) -> torch.Tensor:
    """``m / ||V||`` formed in the norm's precision, cast to ``dtype`` without overflowing to inf."""
    if detach_norm:
        norm_O = norm_O.detach()
    scale_O = magnitude_O.to(norm_O.dtype) / norm_O
    finite_max = torch.finfo(dtype).max
    if finite_max < torch.finfo(scale_O.dtype).max:
        scale_O = scale_O.clamp(-finite_max, finite_max)
    return scale_O.to(dtype)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run ``F.linear(x, ...)`` in, or None outside autocast."""
    device_type = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class _ScaledLinear(torch.autograd.Function):
    """``y = (x Vᵀ) · s`` with ``s`` a per-output-row scale, saving only ``x``, ``V`` and ``s``.

    The plain composition ``F.linear(x, V) * s`` makes autograd save the product ``x Vᵀ``
    (tokens x out) for the gradient of ``s``; here that gradient is formed from the weight
    gradient's own ``(out, in)`` matrix instead: with ``G = grad_yᵀ x``,

        grad_s = rowsum(G ⊙ V),   grad_V = G · s[:, None],   grad_x = (grad_y · s) V.

    ``x`` is saved anyway (``V`` needs it) and ``V`` is a parameter (or autocast's copy, which
    ``F.linear`` would save too), so the only new saved bytes are the vector ``s``, which the
    product used to save. Nothing divides by ``s``, so zero scales are exact.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        direction_OI: torch.Tensor,
        scale_O: torch.Tensor,
    ) -> torch.Tensor:
        need_x, need_v, need_s = ctx.needs_input_grad
        # Save only what the requested gradients read: keeping x alive for a frozen layer whose
        # input needs no gradient would be a saved activation nobody uses.
        ctx.scale_dtype = scale_O.dtype
        ctx.save_for_backward(
            x if need_v or need_s else None,
            direction_OI if need_x or need_s else None,
            scale_O if need_x or need_v else None,
        )
        # No graph is recorded here, so the product can be scaled in place (no second copy).
        return F.linear(x, direction_OI).mul_(scale_O)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, direction_OI, scale_O = ctx.saved_tensors
        need_x, need_v, need_s = ctx.needs_input_grad
        grad_x = grad_direction = grad_scale = None
        if need_x:
            grad_x = (grad_out * scale_O) @ direction_OI
        if need_v or need_s:
            # The weight gradient before scaling: (out, in), the size V's gradient has anyway.
            grad_weight_OI = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            if need_s:
                # Products in V's dtype, summed in (at least) float32: the product's rounding is
                # of the order of G's own (the matmul already rounded G to V's dtype). This
                # (out, in) temporary is freed before grad_V is allocated, so the backward
                # holds at most two weight-sized tensors.
                grad_scale = (grad_weight_OI * direction_OI).sum(
                    dim=1, dtype=_acc(direction_OI.dtype)
                )
                grad_scale = grad_scale.to(ctx.scale_dtype)
            if need_v:
                grad_direction = grad_weight_OI * scale_O[:, None]
        return grad_x, grad_direction, grad_scale


def weight_norm_linear(
    x: torch.Tensor,
    direction_OI: torch.Tensor,
    magnitude_O: torch.Tensor,
    bias_O: torch.Tensor | None = None,
    *,
    detach_norm: bool = False,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """Full-mode forward ``y = (x Vᵀ) · (m / ||V||_row) + b``, no weight-sized temporary.

    Autograd keeps ``x`` (as ``F.linear`` would), ``V`` and the per-row vectors, but not the
    tokens x out product ``x Vᵀ`` (see :class:`_ScaledLinear`).

    With ``detach_norm`` the norm is treated as a constant in the backward pass (DoRA's choice);
    otherwise gradients flow through it (true weight-norm gradient, Salimans & Kingma 2016).
    """
    norm_O = row_norm(direction_OI, eps)
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        # What autocast would do to F.linear's operands; _ScaledLinear's backward then sees
        # consistent dtypes whether or not it runs under autocast.
        x, direction_OI = x.to(autocast_dtype), direction_OI.to(autocast_dtype)
    scale_O = _scale_for(magnitude_O, norm_O, x.dtype, detach_norm)
    out = _ScaledLinear.apply(x, direction_OI, scale_O)
    return out if bias_O is None else out + bias_O


def lora_weight_norm_linear(
    x: torch.Tensor,
    base_weight_OI: torch.Tensor,
    lora_A_RI: torch.Tensor,
    lora_B_OR: torch.Tensor,
    magnitude_O: torch.Tensor,
    bias_O: torch.Tensor | None = None,
    *,
    scaling: float,
    detach_norm: bool = False,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """LoRA-mode forward ``y = (x W0ᵀ + s (x Aᵀ) Bᵀ) · (m / ||W0 + sBA||_row) + b``.

    Unlike full mode, autograd saves the pre-scale output (tokens x out) here: the trick of
    :class:`_ScaledLinear` needs ``rowsum((grad_yᵀ x) ⊙ W0)``, and that (out, in) product is
    a weight gradient the frozen ``W0`` otherwise never gets (avoiding it means recomputing
    ``x W0ᵀ`` in backward).
    """
    out = F.linear(x, base_weight_OI) + scaling * F.linear(F.linear(x, lora_A_RI), lora_B_OR)
    norm_O = lora_row_norm(base_weight_OI, lora_A_RI, lora_B_OR, scaling, eps)
    out = out * _scale_for(magnitude_O, norm_O, out.dtype, detach_norm)
    return out if bias_O is None else out + bias_O


def merge_weight(
    direction_OI: torch.Tensor, magnitude_O: torch.Tensor, eps: float = NORM_EPS
) -> torch.Tensor:
    """``W = diag(m) · V / ||V||_row`` computed in (at least) float32, returned in ``V``'s dtype."""
    norm_O = row_norm(direction_OI, eps)
    scale_O = magnitude_O.to(norm_O.dtype) / norm_O
    return (direction_OI.to(norm_O.dtype) * scale_O[:, None]).to(direction_OI.dtype)


def merge_lora_weight(
    base_weight_OI: torch.Tensor,
    lora_A_RI: torch.Tensor,
    lora_B_OR: torch.Tensor,
    magnitude_O: torch.Tensor,
    scaling: float,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """LoRA-mode ``W = diag(m) · V / ||V||_row`` with ``V = W0 + s·B A``, in ``W0``'s dtype."""
    acc = _acc(base_weight_OI.dtype)
    direction32_OI = lora_direction(
        base_weight_OI.to(acc), lora_A_RI.to(acc), lora_B_OR.to(acc), scaling
    )
    scale_O = magnitude_O.to(acc) / row_norm(direction32_OI, eps)
    return (direction32_OI * scale_O[:, None]).to(base_weight_OI.dtype)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_linear(
    weight_OI: torch.Tensor, bias_O: torch.Tensor | None, *, weight_trainable: bool
) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight_OI`` and ``bias_O`` (copies, same dtype and device):
    what a merged layer becomes. The bias keeps its ``requires_grad``."""
    out_features, in_features = weight_OI.shape
    linear = nn.Linear(
        in_features,
        out_features,
        bias=bias_O is not None,
        device=weight_OI.device,
        dtype=weight_OI.dtype,
    )
    linear.weight.copy_(weight_OI)
    linear.weight.requires_grad_(weight_trainable)
    if bias_O is not None:
        linear.bias.copy_(bias_O)
        linear.bias.requires_grad_(bias_O.requires_grad)
    return linear


class WeightNormLinear(nn.Module):
    """Weight-normalised drop-in for ``nn.Linear`` (per-output-neuron norm, GradNormLoRP).

    Full mode (``lora_rank=None``): parameters ``direction`` (out, in), ``magnitude`` (out,)
    and ``bias`` (out,) if the layer has one.

    LoRA mode (``lora_rank=r``): ``base_weight`` (out, in) is the frozen ``W0`` (a Parameter
    with ``requires_grad=False`` so it is in the ``state_dict`` and follows ``.to()``),
    ``lora_A`` (r, in) is kaiming-uniform initialised like PEFT, ``lora_B`` (out, r) starts at
    zero, and ``magnitude`` starts at ``||W0||_row``. The adapter scaling is
    ``s = lora_alpha / r``; ``lora_alpha`` defaults to ``r``, i.e. ``s = 1``.

    There is deliberately no ``weight`` attribute: the LLaMA-style models of ``transformers``
    only call the projection modules and never read their ``.weight``. Use
    :meth:`merged_weight` or :meth:`to_linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        detach_norm: bool = False,
        eps: float = NORM_EPS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """A freshly initialised layer: the weight is drawn as ``nn.Linear`` would draw it."""
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(linear, lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.detach_norm = detach_norm
        self.eps = eps

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        detach_norm: bool = False,
        eps: float = NORM_EPS,
    ) -> WeightNormLinear:
        """Wrap ``linear`` so that the new layer computes exactly what ``linear`` computed.

        Parameters are copied (same dtype and device). In full mode ``direction`` and
        ``magnitude`` inherit ``linear.weight.requires_grad``; the bias keeps its flag.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(linear, lora_rank=lora_rank, lora_alpha=lora_alpha)
        layer.detach_norm = detach_norm
        layer.eps = eps
        return layer

    def _init_from(
        self, linear: nn.Linear, *, lora_rank: int | None, lora_alpha: float | None
    ) -> None:
        weight_OI = linear.weight.detach()
        if weight_OI.ndim != 2 or not weight_OI.is_floating_point():
            raise ValueError(
                f"WeightNormLinear needs a dense floating-point 2-D weight, got shape "
                f"{tuple(weight_OI.shape)} dtype {weight_OI.dtype}; apply weight norm before "
                "quantising the model or partitioning it (e.g. with DeepSpeed ZeRO-3)."
            )
        out_features, in_features = weight_OI.shape
        if lora_rank is None and lora_alpha is not None:
            raise ValueError(f"lora_alpha={lora_alpha!r} given without lora_rank; set lora_rank.")
        if lora_rank is not None:
            if (
                isinstance(lora_rank, bool)
                or not isinstance(lora_rank, numbers.Integral)
                or not 0 < lora_rank <= min(out_features, in_features)
            ):
                raise ValueError(
                    f"lora_rank={lora_rank!r} must be an int in [1, min(out, in)] = "
                    f"[1, {min(out_features, in_features)}] for a ({out_features}, "
                    f"{in_features}) weight."
                )
            if lora_alpha is None:
                lora_alpha = float(lora_rank)
            if not lora_alpha > 0:
                raise ValueError(f"lora_alpha={lora_alpha!r} must be > 0.")
        self.in_features = in_features
        self.out_features = out_features
        self.lora_rank = None if lora_rank is None else int(lora_rank)
        self.lora_alpha = None if lora_alpha is None else float(lora_alpha)
        self.scaling = None if lora_rank is None else self.lora_alpha / self.lora_rank

        with torch.no_grad():
            magnitude_O = row_norm(weight_OI, eps=0.0).to(weight_OI.dtype)
        if lora_rank is None:
            trainable = linear.weight.requires_grad
            self.direction = nn.Parameter(weight_OI.clone(), requires_grad=trainable)
            self.magnitude = nn.Parameter(magnitude_O, requires_grad=trainable)
        else:
            self.base_weight = nn.Parameter(weight_OI.clone(), requires_grad=False)
            factory = {"device": weight_OI.device, "dtype": weight_OI.dtype}
            self.lora_A = nn.Parameter(torch.empty(self.lora_rank, in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_features, self.lora_rank, **factory))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's LoRA init
            self.magnitude = nn.Parameter(magnitude_O)
        if linear.bias is not None:
            self.bias = nn.Parameter(
                linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad
            )
        else:
            self.register_parameter("bias", None)

    @property
    def is_lora(self) -> bool:
        """Whether the direction is ``W0 + s·B A`` (LoRA mode) rather than a free ``V``."""
        return self.lora_rank is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_lora:
            return lora_weight_norm_linear(
                x,
                self.base_weight,
                self.lora_A,
                self.lora_B,
                self.magnitude,
                self.bias,
                scaling=self.scaling,
                detach_norm=self.detach_norm,
                eps=self.eps,
            )
        return weight_norm_linear(
            x,
            self.direction,
            self.magnitude,
            self.bias,
            detach_norm=self.detach_norm,
            eps=self.eps,
        )

    def projected_parameters(self) -> list[nn.Parameter]:
        """The matrices whose gradients the optimizer projects: ``[direction]`` or ``[A, B]``."""
        if self.is_lora:
            return [self.lora_A, self.lora_B]
        return [self.direction]

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The effective weight ``W = diag(m) · V / ||V||_row`` (out, in), without grad."""
        if self.is_lora:
            return merge_lora_weight(
                self.base_weight, self.lora_A, self.lora_B, self.magnitude, self.scaling, self.eps
            )
        return merge_weight(self.direction, self.magnitude, self.eps)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (same dtype and device).

        Its weight is trainable iff the direction was (full mode) and frozen in LoRA mode,
        like the frozen base layer PEFT's ``merge_and_unload`` hands back.
        """
        trainable = not self.is_lora and self.direction.requires_grad
        return plain_linear(self.merged_weight(), self.bias, weight_trainable=trainable)

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
        ]
        if self.is_lora:
            parts += [
                f"lora_rank={self.lora_rank}",
                f"lora_alpha={self.lora_alpha:g}",
                f"scaling={self.scaling:g}",
            ]
        else:
            parts.append("mode=full")
        parts.append(f"detach_norm={self.detach_norm}")
        return ", ".join(parts)
