"""Shape arithmetic behind the estimator: parameter shapes from a meta-device model, each
parameter's optimizer-state and update-workspace bytes, and the activation terms of a LLaMA
decoder layer. Pure functions of shapes and a :class:`MemoryConfig`; nothing is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from gnlorp_dist.memory.bytes import (
    TORCH_ADAMW_STEP_BYTES,
    basis_bytes,
    basis_groups,
    moment_bytes,
    projected_moment_bytes,
)
from gnlorp_dist.memory.config import DTYPE_BYTES, MemoryConfig
from gnlorp_dist.models import build_model_on_meta, llama_config, recipe_for_config
from gnlorp_dist.nn import apply_weight_norm
from gnlorp_dist.optim import projected_param_groups
from gnlorp_dist.optim.projection import (
    RANDOMIZED_MIN_DIM,
    low_rank_shape,
    projection_shape,
    projection_side,
)
from gnlorp_dist.optim.quantized import update_workspace_bytes

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


def basis_load_bytes(shape: tuple[int, int], proj_bits: int, s: int) -> tuple[int, int]:
    """(peak, result) bytes of restoring a quantised basis for one use (``load_basis`` in the
    gradient's dtype): INT4 unpacks its nibbles (two half-size int8 halves, their int8 stack),
    the codes go to float32 (zero-padded to whole groups), times the scales (float32), then the
    cast to bf16 (bf16 runs). The result is the bf16 copy, or in fp32 the scaled buffer itself.
    A float basis is read as it is: (0, 0)."""
    if proj_bits == 16:
        return 0, 0
    numel = math.prod(shape)
    _, padded = basis_groups(shape)
    unpacked = 2 * numel if proj_bits == 4 else 0
    cast = s * numel if s != 4 else 0
    return unpacked + 8 * padded + cast, (cast if s != 4 else 4 * padded)


def basis_store_bytes(shape: tuple[int, int], proj_bits: int, s: int) -> int:
    """Peak bytes of quantising a new basis (``store_basis``) beyond the basis itself: its
    float32 copy (bf16) or zero-padded copy, the quotient by the scales and its rounding, the
    new codes (and, INT4, the shifted float codes, their uint8 nibbles and the packing), and the
    per-group absmax, scales and divisors."""
    if proj_bits == 16:
        return 0
    numel = math.prod(shape)
    scales, padded = basis_groups(shape)
    grouped = 4 * padded if (padded != numel or s != 4) else 0
    rounded = grouped + 8 * padded
    if proj_bits == 8:
        tail = grouped + 4 * padded + numel
    else:
        tail = grouped + 4 * padded + max(5 * numel, 2 * numel)
    return max(rounded, tail) + 12 * scales


def full_svd_bytes(rows: int, cols: int, proj: int, s: int) -> int:
    """``compute_projection(method="svd")`` beyond the gradient: its float32 copy (bf16 only),
    the thin SVD's U (M x k), S (k) and Vh (k x N) in float32 (k = min(M, N); LAPACK returns them
    column-major, so the r-slice is copied), and the basis cast to bf16 (bf16 only)."""
    k = min(rows, cols)
    copy = 4 * rows * cols if s != 4 else 0
    return copy + 4 * (rows * k + k + k * cols) + 4 * proj + (proj * s if s != 4 else 0)


def randomized_svd_bytes(
    rows: int, cols: int, rank: int, proj: int, s: int, oversample: int = 8, power_iters: int = 2
) -> int:
    """``compute_projection(method="randomized")`` (``projection._randomized_svd``) beyond the
    gradient, on ``a`` (L x S, the larger side first) with ``w = min(r + 8, M, N)`` columns:
    the float32 copy (bf16 only), the sketch ``omega`` (S x w) throughout, then the largest of:
    a power iteration's QR (the previous Q and R, the product, the new Q and R:
    ``4 (2 S w + 2 L w + 2 w^2)``); the small SVD of ``Q^T a`` (Q, R, the product, u, s, vh);
    ``U = Q u`` beside them; the basis sliced (copied) and cast (bf16) beside U and Vh."""
    large, small = max(rows, cols), min(rows, cols)
    w = min(rank + oversample, rows, cols)
    copy = 4 * rows * cols if s != 4 else 0
    first_qr = 4 * (small * w + 2 * large * w + w * w)
    power = 4 * (2 * small * w + 2 * large * w + 2 * w * w) if power_iters > 0 else 0
    svd = 4 * (3 * small * w + large * w + 2 * w * w + w)
    back = 4 * (2 * small * w + 2 * large * w + 2 * w * w + w)
    basis = 4 * (large * w + w * small) + 4 * proj + (proj * s if s != 4 else 0)
    return copy + max(first_qr, power, svd, back, basis)


def svd_method_for(shape: tuple[int, ...], method: str) -> str:
    """The decomposition a refresh of a ``shape`` gradient runs (``auto`` resolved as
    :func:`gnlorp_dist.optim.projection.resolve_svd_method` does)."""
    if method == "auto":
        return "randomized" if min(shape) >= RANDOMIZED_MIN_DIM else "svd"
    return method


class Layout:
    """Byte sizes of one parameter's gradient, states and update workspace under a config."""

    def __init__(self, config: MemoryConfig, rank: int | None) -> None:
        self.c = config
        self.rank = rank
        self.s = DTYPE_BYTES[config.dtype]
        self.bits = config.state_bits
        self.proj_bits = config.proj_bits
        self.factored = config.second_moment == "factored"

    def low_rank(self, p: ParamShape) -> tuple[int, int, str]:
        """(low-rank numel, projection numel, side) of a projected matrix."""
        side = projection_side(p.shape, self.c.proj_type)
        low = math.prod(low_rank_shape(p.shape, self.rank, side))
        return low, math.prod(projection_shape(p.shape, self.rank, side)), side

    def basis_shape(self, p: ParamShape) -> tuple[int, int]:
        side = projection_side(p.shape, self.c.proj_type)
        return projection_shape(p.shape, self.rank, side)

    @property
    def bitsandbytes(self) -> bool:
        """bitsandbytes' ``AdamW8bit`` (``adamw`` at 8 bits, or ``adamw8bit``)."""
        return self.c.optimizer in ("adamw", "adamw8bit") and self.bits == 8

    def moments(self, numel: int) -> int:
        """Adam's two moments of ``numel`` elements in this optimizer's layout: floats in the
        parameter's dtype (GradNormLoRPAdamW, torch AdamW); bitsandbytes keeps the moments of
        its small tensors in float32."""
        return moment_bytes(numel, self.bits, 4 if self.bitsandbytes else self.s)

    def states(self, p: ParamShape) -> tuple[int, int]:
        """(moment bytes, projection bytes) of ``p``."""
        if p.projected and self.c.projected:
            low, _, _ = self.low_rank(p)
            factored = sum(p.shape) if self.factored else 0
            moments = projected_moment_bytes(low, self.bits, self.s, factored_numel=factored)
            return moments, basis_bytes(self.basis_shape(p), self.proj_bits, self.s)
        torch_adamw = self.c.optimizer == "adamw" and self.bits == 32
        return self.moments(p.numel) + (TORCH_ADAMW_STEP_BYTES if torch_adamw else 0), 0

    def moment_update(self, numel: int) -> int:
        """Workspace of the moments' update of ``numel`` elements (GradNormLoRPAdamW's dense and
        projected paths alike): :func:`gnlorp_dist.optim.quantized.update_workspace_bytes`,
        8-bit moments decoded and re-encoded chunk by chunk, float moments in place."""
        return update_workspace_bytes(numel, self.bits, element_size=self.s)

    def dense_update(self, numel: int) -> int:
        """Workspace of one dense AdamW update (``update_dense_block``): the moment update
        (float state: ``sqrt(v) / bc2`` and the denominator alive at once; 8-bit: the chunks).
        bitsandbytes' own AdamW8bit is one fused kernel: no workspace."""
        if self.bitsandbytes:
            return 0
        return self.moment_update(numel)

    def basis_load(self, p: ParamShape) -> tuple[int, int]:
        """(peak, result) of restoring ``p``'s basis for one use (0, 0 for a float basis)."""
        return basis_load_bytes(self.basis_shape(p), self.proj_bits, self.s)

    def projection_step(self, p: ParamShape) -> int:
        """Workspace of projecting ``p``'s gradient G (alive, not counted): the basis restored
        (quantised bases), then R = project(G, basis) beside it."""
        low, _, _ = self.low_rank(p)
        peak, result = self.basis_load(p)
        return max(peak, result + low * self.s)

    def projected_update(self, p: ParamShape) -> int:
        """Workspace of one projected update, from the projected gradient R on (weight dtype).

        The moments are updated chunk by chunk (:meth:`moment_update`) and each chunk's
        direction ``m / (sqrt(v) + eps)`` overwrites R in place (no second low-rank buffer);
        then the basis is restored (quantised bases) and the direction is projected back to
        the full shape (weight dtype) beside R, and added to the weights in place.
        """
        low, _, _ = self.low_rank(p)
        full = p.numel * self.s
        peak, result = self.basis_load(p)
        if self.factored:
            # The back-projection, its float32 copy (bf16 weights), the in-place float32
            # denominator, and the quotient cast back to the weights' dtype.
            full += 4 * p.numel + (4 * p.numel + full if self.s != 4 else 0)
        return low * self.s + max(self.moment_update(low), peak, result + full)

    def refresh(self, p: ParamShape, left: int = 0) -> int:
        """Workspace of a subspace refresh of ``p`` (its gradient itself not included).

        ``compute_projection``: the full SVD (:func:`full_svd_bytes`) or the randomized one
        (:func:`randomized_svd_bytes`), as ``svd_method`` resolves for ``p``'s shape. Quantised
        bases: the new one is quantised beside itself. ``left``: bytes the previous matrix's
        refresh leaves referenced meanwhile (the normal path's loop; see
        :meth:`refresh_leftover`). Lazy refresh (not modelled) also restores the old basis.
        """
        rows, cols = p.shape
        _, proj, _ = self.low_rank(p)
        if svd_method_for(p.shape, self.c.svd_method) == "randomized":
            svd = randomized_svd_bytes(rows, cols, self.rank, proj, self.s)
        else:
            svd = full_svd_bytes(rows, cols, proj, self.s)
        work = svd
        if self.proj_bits != 16:
            shape = self.basis_shape(p)
            store = basis_store_bytes(shape, self.proj_bits, self.s)
            work = max(svd, proj * self.s + store)
        # The non-finite check before it is one fused norm per gradient (scalars only).
        return left + work

    def refresh_leftover(self, p: ParamShape) -> int:
        """What a refresh of ``p`` in the normal path's loop leaves referenced until the next
        matrix's refresh: with quantised bases the new float basis (a float basis is the
        state's own tensor)."""
        _, proj, _ = self.low_rank(p)
        return 0 if self.proj_bits == 16 else proj * self.s


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
    one, except for the MLP's up/gate, whose output gradient is new). WeightNormLinear
    (``_ScaledLinear``, which saves no pre-scale output): first the scaled output gradient
    beside the input's gradient (tokens x (out + in)); then, beside the input's gradient, the
    weight gradient ``G``, ``G * V`` (for the scale's gradient, freed) and ``G * s``, and the row
    norm's part of V's gradient and the sum of the two parts: three weight-sized tensors at
    most, and in bf16 also the norm backward's float32 weight-sized product (the norm is taken
    in float32). Checked against the live-tensor accounting of one layer's backward.
    """
    h, inter = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    linears = ((h, q_dim), (h, kv_dim), (q_dim, h), (h, inter), (inter, h))
    per_linear = []
    for i, o in linears:
        w = i * o
        if shape.weight_norm:
            norm_copy = 4 * w if s != 4 else 0
            per_linear.append(max(s * tokens * (o + i), s * (tokens * i + 3 * w) + norm_copy))
        else:
            per_linear.append(s * (tokens * (i + (o if o != h else 0)) + w))
    return max(per_linear)


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
