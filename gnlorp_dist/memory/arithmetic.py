"""Shape arithmetic behind the estimator: parameter shapes from a meta-device model, each
parameter's optimizer-state and update-workspace bytes, and the activation terms of a LLaMA
decoder layer. Pure functions of shapes and a :class:`MemoryConfig`; nothing is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from gnlorp_dist.models import build_model_on_meta, llama_config, recipe_for_config
from gnlorp_dist.nn import apply_weight_norm
from gnlorp_dist.optim import projected_param_groups
from gnlorp_dist.optim.quantized import BLOCK_SIZE, MIN_8BIT_NUMEL
from gnlorp_dist.projection import low_rank_shape, projection_shape, projection_side

if TYPE_CHECKING:
    from gnlorp_dist.memory.estimator import MemoryConfig

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp32": 4}
"""Bytes per element of each supported weight dtype."""


# -- model shapes (meta device) ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ParamShape:
    """One trainable parameter as the optimizer sees it."""

    name: str
    shape: tuple[int, ...]
    projected: bool
    """In the projected group (its gradient is projected to rank r)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the arithmetic needs from a LLaMA model: its dimensions and parameter shapes."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    weight_norm: bool
    """Targeted linear layers are :class:`WeightNormLinear` (gradnormlorp)."""
    params: tuple[ParamShape, ...]
    buffer_numel: int
    """Floating-point buffer elements (rotary inverse frequencies), stored in the weight dtype."""
    recipe_rank: int

    def param(self, suffix: str) -> ParamShape | None:
        """The parameter whose name ends with ``suffix`` (None if there is none)."""
        return next((p for p in self.params if p.name.endswith(suffix)), None)


def model_shape(model: str, *, weight_norm: bool, projected: bool = True) -> ModelShape:
    """Dimensions and parameter shapes of ``model`` from a meta-device build (no memory)."""
    config = llama_config(model)
    meta = build_model_on_meta(config)
    if weight_norm:
        apply_weight_norm(meta)
    projected_ids: set[int] = set()
    if projected:
        groups = projected_param_groups(meta, rank=1, update_proj_gap=1, scale=1.0)
        projected_ids = {id(p) for p in groups[0]["params"]}
    params = tuple(
        ParamShape(name=name, shape=tuple(p.shape), projected=id(p) in projected_ids)
        for name, p in meta.named_parameters()
        if p.requires_grad
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        weight_norm=weight_norm,
        params=params,
        buffer_numel=sum(b.numel() for b in meta.buffers() if b.is_floating_point()),
        recipe_rank=recipe_for_config(config).rank,
    )


@cache
def cached_model_shape(model: str, weight_norm: bool) -> ModelShape:
    return model_shape(model, weight_norm=weight_norm)


# -- per-parameter bytes: states, projection, update workspace ------------------------------


def quantized_bytes(numel: int) -> int:
    """One 8-bit moment: uint8 codes plus one float32 scale per block."""
    return numel + 4 * math.ceil(numel / BLOCK_SIZE)


class Layout:
    """Byte sizes of one parameter's gradient, states and update workspace under a config."""

    def __init__(self, config: MemoryConfig, rank: int | None) -> None:
        self.c = config
        self.rank = rank
        self.s = DTYPE_BYTES[config.dtype]
        self.bits = config.state_bits

    def low_rank(self, p: ParamShape) -> tuple[int, int, str]:
        """(low-rank numel, projection numel, side) of a projected matrix."""
        side = projection_side(p.shape, self.c.proj_type)
        low = math.prod(low_rank_shape(p.shape, self.rank, side))
        return low, math.prod(projection_shape(p.shape, self.rank, side)), side

    def _quantised(self, numel: int) -> bool:
        return self.bits == 8 and numel >= MIN_8BIT_NUMEL

    def moments(self, numel: int) -> int:
        """Adam's two moments of ``numel`` elements in this optimizer's layout."""
        if self.c.optimizer in ("adamw", "adamw8bit") and self.bits == 8:
            # bitsandbytes AdamW8bit: small tensors keep float32 moments
            return 2 * (quantized_bytes(numel) if numel >= MIN_8BIT_NUMEL else 4 * numel)
        if self._quantised(numel):
            return 2 * quantized_bytes(numel)
        return 2 * self.s * numel  # GradNormLoRPAdamW and torch AdamW: the parameter's dtype

    def states(self, p: ParamShape) -> tuple[int, int]:
        """(moment bytes, projection bytes) of ``p``."""
        if p.projected and self.c.projected:
            low, proj, _ = self.low_rank(p)
            return self.moments(low), self.s * proj
        extra = 4 if self.c.optimizer == "adamw" and self.bits == 32 else 0  # torch's step tensor
        return self.moments(p.numel) + extra, 0

    def dense_update(self, numel: int) -> int:
        """Workspace of one dense AdamW update (``dense_adamw_step``).

        The moments are updated in place; ``(sqrt(v) / bc2).add_(eps)`` holds the square root
        and the quotient at once. 8-bit moments are first dequantized to float32 (both), and
        re-quantised at the end (codes and scales, then copied into the state). bitsandbytes'
        own AdamW8bit is one fused kernel: no workspace.
        """
        if self.c.optimizer in ("adamw", "adamw8bit") and self.bits == 8:
            return 0
        if self._quantised(numel) and self.c.fused_8bit_update:
            return 0
        if not self._quantised(numel):
            return 2 * self.s * numel
        return max(4 * 4 * numel, 2 * 4 * numel + quantized_bytes(numel))

    def projected_update(self, p: ParamShape) -> int:
        """Workspace of one projected update, from the projected gradient R on.

        R (low-rank, weight dtype); 8-bit: both moments dequantized (float32); then
        ``m / (sqrt(v) + eps)`` (square root and quotient alive together), then the quotient
        projected back to the full shape (weight dtype) while R and the quotient live; 8-bit:
        finally the re-quantised codes and scales.
        """
        low, _, _ = self.low_rank(p)
        full = p.numel * self.s
        r_bytes = low * self.s
        if not self._quantised(low):
            return r_bytes + max(2 * low * self.s, low * self.s + full)
        if self.c.fused_8bit_update:  # the direction leaves the kernel in the weight dtype
            return r_bytes + low * self.s + full
        dequantized = 2 * 4 * low
        # A float32 quotient with bf16 weights is cast to bf16 before projecting back (see notes).
        cast = low * self.s if self.s != 4 else 0
        return r_bytes + dequantized + max(2 * 4 * low, 4 * low + cast + full, quantized_bytes(low))

    def refresh(self, p: ParamShape) -> int:
        """Workspace of a subspace refresh of ``p`` (its gradient itself not included).

        ``isfinite(G)``: ``abs`` (weight dtype) and three boolean masks. ``compute_projection``:
        a float32 copy of G (bf16 only), the thin SVD's U (M x k), S (k) and Vh (k x N) with
        k = min(M, N), float32 (LAPACK returns them column-major, so the r-slice is copied), and
        the basis cast to the weight dtype (bf16 only).
        """
        rows, cols = p.shape
        k = min(rows, cols)
        _, proj, _ = self.low_rank(p)
        isfinite = p.numel * (self.s + 3)
        copy = 4 * p.numel if self.s != 4 else 0
        svd = 4 * (rows * k + k + k * cols) + 4 * proj + (proj * self.s if self.s != 4 else 0)
        return max(isfinite, copy + svd)


# -- activations -------------------------------------------------------------------------------


def _layer_terms(shape: ModelShape, s: int) -> dict[str, int]:
    """Bytes per token that one decoder layer saves for backward, by term (sdpa attention).

    Derived op by op from ``transformers``' LlamaDecoderLayer (and WeightNormLinear):

    - each RMSNorm saves its input in float32 (the input itself in fp32, a float32 copy in
      bf16: ``pow`` and the ``* rsqrt`` product), ``rsqrt`` (one float per token) and the
      normalised tensor in the weight dtype (for ``weight * x``);
    - q/k/v share one saved input, gate/up another; o_proj's input is the attention output,
      down_proj's the SwiGLU product;
    - rotary embedding multiplies by cos/sin, which do not need grad, so it saves only them;
      sdpa (flash kernel) saves q and k after rotary, v, its output and the log-sum-exp
      (float32, one per head and token);
    - SiLU saves its input, the SwiGLU product both factors;
    - a WeightNormLinear computes ``(x V^T) * (m / ||V||)`` in one autograd Function that
      saves only its input, ``V`` and the scale (the scale's gradient comes from the weight
      gradient, not from a saved pre-scale output): nothing per token beyond the input; its
      vectors are :func:`_weight_norm_vector_bytes`.
    """
    h, inter = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    terms = {
        "rms_norm": 2 * (4 * h + 4 + s * h),
        "linear_inputs": s * (h + q_dim + h + inter),
        "attention": s * (q_dim + 2 * kv_dim) + 4 * shape.heads,
        "swiglu": s * 3 * inter,
    }
    return terms


def _weight_norm_vector_bytes(shape: ModelShape, s: int) -> int:
    """Per-layer bytes that do not scale with tokens: each WeightNormLinear saves its row norm
    (float32, before and after the clamp) and the scale ``m / ||V||`` (weight dtype); in bf16
    also the float32 copy of m and the float32 scale before the overflow clamp."""
    if not shape.weight_norm:
        return 0
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    outs = q_dim + 2 * kv_dim + 2 * shape.hidden + 2 * shape.intermediate
    return outs * (8 + s + (8 if s != 4 else 0))


def layer_activation_bytes(shape: ModelShape, tokens: int, s: int) -> int:
    """What one decoder layer saves for backward (recomputed under checkpointing)."""
    return tokens * sum(_layer_terms(shape, s).values()) + _weight_norm_vector_bytes(shape, s)


def layer_backward_workspace(shape: ModelShape, tokens: int, s: int) -> int:
    """Largest workspace of one decoder layer's backward pass beyond its saved tensors and the
    residual stream's gradient (approximate: the largest linear layer's, in -> out).

    Plain linear: the input's gradient and the weight's (the output's gradient is the incoming
    one, except for the MLP's up/gate, whose output gradient is new). WeightNormLinear: the
    pre-scale output's gradient is new too, and the weight gradient comes in two weight-sized
    parts (row norm, matmul) that are then summed: the larger of (output + input gradients +
    two weight-sized) and (input gradient + three weight-sized).
    """
    h, inter = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    linears = ((h, q_dim), (h, kv_dim), (q_dim, h), (h, inter), (inter, h))
    per_linear = []
    for i, o in linears:
        w = i * o
        if shape.weight_norm:
            per_linear.append(max(tokens * (o + i) + 2 * w, tokens * i + 3 * w))
        else:
            per_linear.append(tokens * (i + (o if o != h else 0)) + w)
    return s * max(per_linear)


def activation_terms(
    shape: ModelShape, *, tokens: int, s: int, checkpointing: bool, sequences: int = 1
) -> dict[str, int]:
    """Bytes autograd keeps from one micro-batch's forward pass at its end, by term.

    Besides the decoder layers (:func:`_layer_terms`, or under checkpointing only each layer's
    input hidden states): cos/sin of the rotary embedding (weight dtype, shared by all
    layers), the final RMSNorm and lm_head's input, the float32 ``log_softmax`` output of the
    loss (tokens x vocab; ``transformers`` upcasts the logits) and the shifted labels.
    """
    h = shape.hidden
    terms: dict[str, int] = {}
    if checkpointing:
        terms["checkpointed_layer_inputs"] = shape.layers * tokens * s * h
    else:
        for name, per_token in _layer_terms(shape, s).items():
            terms[name] = shape.layers * tokens * per_token
        vectors = shape.layers * _weight_norm_vector_bytes(shape, s)
        if vectors:
            terms["weight_norm_vectors"] = vectors
    terms["rotary_cos_sin"] = 2 * tokens * shape.head_dim * s
    terms["final_norm"] = tokens * (4 * h + 4 + s * h)
    terms["lm_head_input"] = tokens * s * h
    terms["log_softmax"] = tokens * shape.vocab * 4
    terms["loss_target"] = 8 * (tokens + sequences) + 4
    return terms
