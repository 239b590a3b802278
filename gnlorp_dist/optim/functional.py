"""The AdamW updates as pure functions over tensors (no optimizer, no ranks).

Two conventions live side by side, each matching its reference bit for bit in intent:

- GaLore's AdamW on a low-rank gradient (``galore_torch.GaLoreAdamW``), in the pieces the driver
  runs on runs of a matrix: :func:`update_moments_`, :func:`normalized_low_rank_update`
  (``denom = sqrt(v) + eps``), :func:`scale_low_rank_direction_` (both bias corrections folded
  into the step size, times ``scale``), the projection back, then
  :func:`apply_projected_update_` (the update, then decoupled weight decay ``p -= lr * wd * p``
  *after* it). tests/unit/reference_math.py composes them into the
  whole-matrix step the tests compare with GaLore.
- :func:`dense_adamw_step` is ``torch.optim.AdamW``: weight decay ``p *= 1 - lr * wd`` *before*
  the update and ``denom = sqrt(v) / sqrt(bc2) + eps``.

The two differ only in where ``eps`` and weight decay enter; each is kept so that the projected
groups reproduce GaLore and the dense groups reproduce PyTorch.
"""

from __future__ import annotations

import math

from torch import Tensor


def update_moments_(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float
) -> None:
    """Adam's running moments, in place: ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def galore_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """GaLore's step size after ``step`` (1-based) updates: ``lr * sqrt(1-b2^t) / (1-b1^t)``."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def normalized_low_rank_update(exp_avg: Tensor, exp_avg_sq: Tensor, eps: float) -> Tensor:
    """``m / (sqrt(v) + eps)``: the low-rank Adam direction before bias correction."""
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def scale_low_rank_direction_(
    direction_low: Tensor, *, step: int, lr: float, beta1: float, beta2: float, scale: float
) -> Tensor:
    """The low-rank Adam direction times ``-(GaLore's step size) * scale``, in place (no second
    low-rank workspace at the step's peak): the whole step, so that back-projecting it gives the
    weights' update with no scalar left to apply. The scalar rides on the small ``r``-wide
    matrix (cheaper than on the full one), and the update is then a plain ``add`` of a matmul:
    CPU inductor drops the ``alpha`` of ``add(x, a @ b, alpha=s)``, which made a compiled
    ``step()`` ~1000x too large."""
    return direction_low.mul_(-galore_step_size(lr, beta1, beta2, step) * scale)


def apply_projected_update_(
    param: Tensor, update_full: Tensor, *, lr: float, weight_decay: float
) -> None:
    """The element-wise tail of GaLore's projected AdamW step, in place on ``param``.

    ``update_full`` is the back-projection of :func:`scale_low_rank_direction_` for the
    elements of ``param``; any slice of a matrix can be updated on its own, which is what
    sharded (ZeRO) layouts do. Then GaLore's decoupled weight decay.
    """
    param.add_(update_full)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


def apply_factored_update_(
    param: Tensor,
    quotient: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    weight_decay: float,
    scale: float,
) -> None:
    """ProjFactor's element-wise tail, in place: ``param -= lr * scale * quotient / (1 - b1^t)``
    then GaLore's decoupled weight decay. ``quotient`` is ``back(m) / (sqrt(V^_hat) + eps)``
    (the second moment's bias correction is inside its denominator, so only ``m``'s is here)."""
    param.add_(quotient.to(param.dtype), alpha=-lr * scale / (1.0 - beta1**step))
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


def dense_adamw_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.AdamW`` update of ``param``, in place (``step`` is 1-based)."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    update_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def clip_by_norm_(tensor: Tensor, max_norm: float) -> None:
    """Scale ``tensor`` in place so its L2 norm is at most ``max_norm`` (no-op when 0).

    Same coefficient as ``torch.nn.utils.clip_grad_norm_``: ``max_norm / (norm + 1e-6)``,
    applied only when it is below 1. Computed on the tensor's device (no host sync): in float64,
    then rounded to float32, which is the value a Python-float coefficient had, so the result is
    bitwise that of a host-side computation; a coefficient clamped to 1 leaves values unchanged.
    """
    if max_norm <= 0.0:
        return
    coefficient = max_norm / (tensor.norm().double() + 1e-6)
    tensor.mul_(coefficient.clamp(max=1.0).float())
