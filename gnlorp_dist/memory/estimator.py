"""Peak training memory of a LLaMA model, by shape arithmetic (no tensor is allocated).

The parameter list comes from a meta-device model (real modules, real weight-norm surgery, real
parameter groups), so any Hugging Face LLaMA config works; every byte after that is arithmetic
over shapes, mirroring what the code does step by step:

- states: the optimizer's real layout (:mod:`gnlorp_dist.optim.quantized`: uint8 codes plus one
  float32 scale per 256-element block, tensors under 4096 elements kept in the moment dtype;
  projected moments have the low-rank shape of :mod:`gnlorp_dist.optim.projection`); projection bases
  in the gradient's dtype or, with ``proj_bits`` 8/4, as INT8/INT4 codes plus float32 scales
  (:mod:`gnlorp_dist.optim.quantized_basis`), restored for each use;
- update workspaces: 8-bit moments decoded and re-encoded chunk by chunk
  (:func:`gnlorp_dist.optim.quantized.update_workspace_bytes`), the projected direction written
  over the low-rank gradient, the refresh's full or randomized SVD as ``svd_method`` resolves;
- activations: :func:`~gnlorp_dist.memory.arithmetic.activation_terms`, one term per tensor that autograd saves in a LLaMA
  decoder layer with ``sdpa`` attention (derived op by op and checked, byte for byte, against
  the saved-tensor hooks of :mod:`gnlorp_dist.memory.accounting`);
- the peak: the live set at each moment of a step where it can be highest (:func:`_moments`),
  the largest of them. Gradients are not simply "all of them plus all activations": in the
  normal path every gradient exists only from the backward pass on, when most activations are
  gone; with per-layer updates at most one full gradient (plus the update's workspace) exists.

The step modelled is ``gnlorp-train``'s: gradients set to None, ``model(**mb).loss / k`` and
``backward()`` for each micro-batch, ``optimizer.step()`` (normal path), gradients set to None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gnlorp_dist.memory.arithmetic import (
    Layout,
    ModelShape,
    ParamShape,
    activation_terms,
    cached_model_shape,
    layer_activation_bytes,
    layer_backward_workspace,
)
from gnlorp_dist.memory.bytes import dense_bytes
from gnlorp_dist.memory.config import MemoryConfig
from gnlorp_dist.optim.projection import PROJ_TYPES

COMPONENTS: tuple[str, ...] = (
    "weights",
    "gradients",
    "optimizer_states",
    "projection",
    "accumulation_buffers",
    "activations",
    "inputs",
    "temporaries",
)
"""Components of an estimate's breakdown (the measured accounting uses the same names)."""


@dataclass(kw_only=True)
class MemoryEstimate:
    """Estimated peak bytes per GPU and the live set at that moment."""

    config: MemoryConfig
    total_bytes: int
    """The peak: the largest total over :attr:`moments`."""
    breakdown: dict[str, int]
    """Live bytes at the peak by component (:data:`COMPONENTS`); sums to ``total_bytes``."""
    peak_moment: str
    """The moment of the step where the peak is (a key of :attr:`moments`)."""
    moments: dict[str, dict[str, int]]
    """Every candidate moment's live bytes by component."""
    full_gradient_bytes: int
    """One gradient per trainable parameter (what the normal path holds after backward)."""
    peak_gradient_bytes: int
    """Largest gradient bytes alive at any modelled moment."""
    saved_activation_bytes: int
    """Bytes autograd saves in one micro-batch's forward pass (at its end)."""
    activation_terms: dict[str, int]
    """``saved_activation_bytes`` by term (see :func:`activation_terms`)."""
    num_parameters: int
    """Parameter elements (weight-norm magnitudes included)."""
    rank: int | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"total_bytes": self.total_bytes}
        out.update({f"{name}_bytes": value for name, value in self.breakdown.items()})
        out.update(
            peak_moment=self.peak_moment,
            total_gib=self.total_bytes / 2**30,
            total_gb=self.total_bytes / 1e9,
            full_gradient_bytes=self.full_gradient_bytes,
            peak_gradient_bytes=self.peak_gradient_bytes,
            saved_activation_bytes=self.saved_activation_bytes,
            activation_terms=dict(self.activation_terms),
            num_parameters=self.num_parameters,
            rank=self.rank,
            moments={k: dict(v, total=sum(v.values())) for k, v in self.moments.items()},
            config=asdict(self.config),
            notes=list(self.notes),
        )
        return out


# -- the peak ----------------------------------------------------------------------------------


def estimate_memory(config: MemoryConfig) -> MemoryEstimate:
    """Peak memory per GPU of one training step under ``config`` (shape arithmetic only)."""
    if config.proj_type not in PROJ_TYPES:
        raise ValueError(
            f"proj_type={config.proj_type!r} is not supported; use one of {PROJ_TYPES}"
        )
    shape = cached_model_shape(config.model, config.optimizer == "gradnormlorp")
    rank = _resolve_rank(config, shape)
    layout = Layout(config, rank)
    s = layout.s
    sequences = config.tokens // (config.seq_len or config.tokens)
    acts = activation_terms(
        shape,
        tokens=config.tokens,
        s=s,
        checkpointing=config.activation_checkpointing,
        sequences=sequences,
    )
    moments = _moments(config, shape, layout, acts)
    peak = max(moments, key=lambda name: sum(moments[name].values()))
    breakdown = moments[peak]
    return MemoryEstimate(
        config=config,
        total_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        peak_moment=peak,
        moments=moments,
        full_gradient_bytes=dense_bytes(sum(p.numel for p in shape.params), s),
        peak_gradient_bytes=max(m["gradients"] for m in moments.values()),
        saved_activation_bytes=sum(acts.values()),
        activation_terms=acts,
        num_parameters=sum(p.numel for p in shape.params),
        rank=rank,
        notes=_notes(config, shape),
    )


def _resolve_rank(config: MemoryConfig, shape: ModelShape) -> int | None:
    if not config.projected:
        return None
    rank = config.rank if config.rank is not None else shape.recipe_rank
    smallest = min(min(p.shape) for p in shape.params if p.projected)
    if rank > smallest:
        raise ValueError(
            f"rank={rank} exceeds the smallest side {smallest} of a projected matrix of "
            f"{config.model!r}; use rank <= {smallest}"
        )
    return rank


@dataclass(frozen=True, kw_only=True)
class _StepBytes:
    """The byte sizes every moment of a step is built from (one config, one model)."""

    base: dict[str, int]
    """Live at every moment: weights (and buffers), optimizer states, projection, the batch."""
    grad_full: int
    """One gradient per trainable parameter."""
    grad_lm: int
    """lm_head's gradient (the embedding's when tied)."""
    grad_embed: int
    tied: bool
    carried: int
    """What earlier micro-batches leave alive in the last one: the normal path's accumulated
    gradients; per-layer the dense parameters' accumulated gradients."""
    buffers: int
    """Per-layer with accumulation: the low-rank gradient sums."""
    acts: dict[str, int]
    """Saved activations by term (:func:`activation_terms`)."""
    in_layer: int
    """A decoder layer's activations, recomputed in its backward under checkpointing."""
    logits: int
    """Elements of the logits (tokens x vocabulary)."""
    hidden: int
    """Bytes of one hidden-state tensor (tokens x hidden, weight dtype)."""
    workspace: int
    """A decoder layer's backward workspace (approximate)."""

    @property
    def saved(self) -> int:
        return sum(self.acts.values())

    @property
    def loss_saved(self) -> int:
        return self.acts["log_softmax"] + self.acts["loss_target"]

    @property
    def decoder_acts(self) -> int:
        """Inside the first decoder layer the backward pass reaches (the model's last): nearly
        every activation (its own recomputed under checkpointing)."""
        head_saved = self.acts["final_norm"] + self.acts["lm_head_input"]
        return self.saved - self.loss_saved - head_saved + self.in_layer


def _persistent(config: MemoryConfig, shape: ModelShape, layout: Layout) -> dict[str, int]:
    """Live at every moment: weights (and buffers), optimizer states (sharded evenly over the
    ranks with ``shard_states``), projection bases, the batch."""
    params = shape.params
    states = sum(layout.states(p)[0] for p in params)
    proj = sum(layout.states(p)[1] for p in params)
    if config.shard_states and config.world_size > 1:
        states = math.ceil(states / config.world_size)
        proj = math.ceil(proj / config.world_size)
    return {
        "weights": dense_bytes(sum(p.numel for p in params) + shape.buffer_numel, layout.s),
        "optimizer_states": states,
        "projection": proj,
        "inputs": dense_bytes(config.tokens, 8),  # input_ids, also the labels (one int64 tensor)
    }


def _step_bytes(
    config: MemoryConfig, shape: ModelShape, layout: Layout, acts: dict[str, int]
) -> _StepBytes:
    s, tokens = layout.s, config.tokens
    projected = _projected(config, shape)
    grad_full = dense_bytes(sum(p.numel for p in shape.params), s)
    embed = shape.param("embed_tokens.weight")
    head = shape.param("lm_head.weight") or embed  # tied: one matrix, stepped once at the end
    carried = buffers = 0
    if config.accumulation_steps > 1:
        dense = grad_full - dense_bytes(sum(p.numel for p in projected), s)
        carried = dense if config.per_layer else grad_full
        if config.per_layer:
            buffers = dense_bytes(sum(layout.low_rank(p)[0] for p in projected), s)
    checkpointing = config.activation_checkpointing
    return _StepBytes(
        base=_persistent(config, shape, layout),
        grad_full=grad_full,
        grad_lm=dense_bytes(head.numel, s),
        grad_embed=dense_bytes(embed.numel, s),
        tied=head is embed,
        carried=carried,
        buffers=buffers,
        acts=acts,
        in_layer=layer_activation_bytes(shape, tokens, s) if checkpointing else 0,
        logits=tokens * shape.vocab,
        hidden=tokens * shape.hidden * s,
        workspace=layer_backward_workspace(shape, tokens, s),
    )


def _projected(config: MemoryConfig, shape: ModelShape) -> list[ParamShape]:
    return [p for p in shape.params if p.projected and config.projected]


class _Moments(dict):
    """Live bytes by component (:data:`COMPONENTS`) at each named moment of the step."""

    def __init__(self, base: dict[str, int]) -> None:
        super().__init__()
        self.base = base

    def add(
        self, name: str, *, grads: int = 0, acts: int = 0, temps: int = 0, buf: int = 0
    ) -> None:
        live = dict(
            self.base,
            gradients=grads,
            accumulation_buffers=buf,
            activations=acts,
            temporaries=temps,
        )
        self[name] = {component: live[component] for component in COMPONENTS}


def _moments(
    config: MemoryConfig, shape: ModelShape, layout: Layout, acts: dict[str, int]
) -> dict[str, dict[str, int]]:
    """Live bytes by component at each moment of the step where the peak can be.

    Persistent at every moment: weights (and buffers), optimizer states, projection matrices,
    the batch. ``carried``: what earlier micro-batches leave alive in the last one (the normal
    path's accumulated gradients; per-layer: the dense parameters' accumulated gradients and
    the low-rank gradient sums).

    Modelled op by op (and matched to the byte by the accounting on CPU): forward_loss,
    loss_backward, lm_head_backward, lm_head_update, embedding_update, embedding_backward,
    optimizer_step. Approximate (upper bounds of a moment inside a decoder layer's backward,
    which sets the peak only when the vocabulary is small next to the layers):
    decoder_backward, first_layer_backward, matrix_update.
    """
    b = _step_bytes(config, shape, layout, acts)
    moments = _Moments(b.base)
    _loss_moments(moments, b, layout.s)
    if config.per_layer:
        _per_layer_moments(moments, b, config, shape, layout)
    else:
        _normal_path_moments(moments, b, config, shape, layout)
    return dict(moments)


def _loss_moments(moments: _Moments, b: _StepBytes, s: int) -> None:
    """The loss's forward and backward, and lm_head's matmul backward."""
    nv, acts = b.logits, b.acts
    # The loss: logits (weight dtype), their float32 copy (bf16), log_softmax's output.
    moments.add("forward_loss", grads=b.carried, buf=b.buffers, acts=b.saved,
                temps=nv * s + (nv * 4 if s != 4 else 0))  # fmt: skip
    # log_softmax backward: its saved output, the incoming and the outgoing float32 gradients.
    moments.add("loss_backward", grads=b.carried, buf=b.buffers,
                acts=b.saved - acts["loss_target"], temps=2 * nv * 4)  # fmt: skip
    # lm_head's matmul backward: grad of the logits (weight dtype), lm_head's new weight grad,
    # the grad of its input.
    moments.add("lm_head_backward", grads=b.carried, buf=b.buffers, acts=b.saved - b.loss_saved,
                temps=nv * s + b.grad_lm + b.hidden)  # fmt: skip


def _per_layer_moments(
    moments: _Moments, b: _StepBytes, config: MemoryConfig, shape: ModelShape, layout: Layout
) -> None:
    """Per-layer updates: each matrix is stepped in its gradient hook, so at most one full
    gradient (plus the update's workspace) exists beside the dense ones being accumulated."""
    nh = b.hidden
    # Tied embeddings: lm_head's gradient waits in the engine for the embedding's part.
    pending = b.grad_lm if b.tied else 0
    if not b.tied:
        head = shape.param("lm_head.weight")
        moments.add("lm_head_update", grads=max(b.carried, b.grad_lm), buf=b.buffers,
                    acts=b.saved - b.loss_saved - b.acts["lm_head_input"],
                    temps=nh + layout.dense_update(head.numel))  # fmt: skip
    others = max(b.carried - b.grad_lm, 0)
    moments.add("decoder_backward", grads=others, buf=b.buffers, acts=b.decoder_acts,
                temps=nh + b.workspace + pending)  # fmt: skip
    matrix, grads, temps = _worst_matrix_hook(layout, _projected(config, shape), config.refresh)
    if matrix is not None:
        moments.add("matrix_update", grads=others + grads, buf=b.buffers, acts=b.decoder_acts,
                    temps=nh + temps + pending)  # fmt: skip
    embed = shape.param("embed_tokens.weight")
    moments.add("embedding_update", grads=b.grad_embed, temps=layout.dense_update(embed.numel))


def _normal_path_moments(
    moments: _Moments, b: _StepBytes, config: MemoryConfig, shape: ModelShape, layout: Layout
) -> None:
    """The normal path: every gradient from the backward pass on, then ``optimizer.step()``."""
    s, tokens, nh = layout.s, config.tokens, b.hidden
    moments.add("decoder_backward", grads=max(b.carried, b.grad_lm), acts=b.decoder_acts,
                temps=nh + b.workspace)  # fmt: skip
    # The last decoder layer in the backward pass (layer 0): every other layer's activations
    # are gone, its own (recomputed under checkpointing) and the rotary cos/sin remain. Its
    # own weights' gradients arrive during its backward (the workspace counts the one being
    # formed), so the other layers' are the ones present.
    layer0_acts = b.acts["rotary_cos_sin"] + layer_activation_bytes(shape, tokens, s)
    if config.activation_checkpointing:
        layer0_acts += tokens * s * shape.hidden
    layer_grads = dense_bytes(sum(p.numel for p in shape.params if ".layers.0." in p.name), s)
    moments.add("first_layer_backward", acts=layer0_acts, temps=nh + b.workspace,
                grads=max(b.carried, b.grad_full - b.grad_embed - layer_grads))  # fmt: skip
    # Accumulating a gradient (k > 1, or a tied lm_head's part) adds it out of place.
    summed = b.grad_embed * ((config.accumulation_steps > 1) + 2 * b.tied)
    moments.add("embedding_backward", grads=b.grad_full, temps=nh + summed)
    moments.add("optimizer_step", grads=b.grad_full,
                temps=_optimizer_step_workspace(config, shape, layout))  # fmt: skip


def _optimizer_step_workspace(config: MemoryConfig, shape: ModelShape, layout: Layout) -> int:
    """The largest workspace of ``optimizer.step()``: matrix by matrix, project (its gradient
    stays alive), update, project back; before them every due matrix's refresh."""
    projected = _projected(config, shape)
    step_workspace = [
        max(layout.projection_step(p), layout.projected_update(p))
        if p in projected
        else layout.dense_update(p.numel)
        for p in shape.params
    ]
    if config.refresh:
        # Every due matrix refreshes first, in order; each leaves its replaced basis (and with
        # quantised bases its float basis) referenced until the next one's.
        left = 0
        for p in projected:
            step_workspace.append(layout.refresh(p, left))
            left = layout.refresh_leftover(p)
    return max(step_workspace)


def _worst_matrix_hook(
    layout: Layout, projected: list[ParamShape], refresh: bool
) -> tuple[ParamShape | None, int, int]:
    """(matrix, gradient bytes, workspace bytes) of the costliest per-layer projected hook.

    In the hook the full gradient G lives through the refresh (if due) and the projection;
    then it is freed and the update runs on R alone.
    """
    worst: tuple[ParamShape | None, int, int] = (None, 0, 0)
    for p in projected:
        grad = layout.s * p.numel
        with_grad = max(layout.refresh(p) if refresh else 0, layout.projection_step(p))
        for grads, temps in ((grad, with_grad), (0, layout.projected_update(p))):
            if grads + temps > worst[1] + worst[2]:
                worst = (p, grads, temps)
    return worst


def _notes(config: MemoryConfig, shape: ModelShape) -> list[str]:
    notes = [
        "live tensor bytes; not modelled: kernel workspaces (cuBLAS, cuSOLVER/LAPACK SVD, "
        "attention kernels), the CUDA context, and the caching allocator's rounding and "
        "fragmentation (measure with torch.cuda.max_memory_allocated / nvidia-smi)",
    ]
    if config.optimizer == "adamw" and config.state_bits == 32:
        notes.append(
            "torch AdamW modelled one parameter at a time (foreach=False, CPU's default); on "
            "CUDA foreach=True adds a temporary the size of one moment of every parameter"
        )
    if shape.param("lm_head.weight") is None:
        notes.append("tied input/output embeddings: modelled approximately (not validated)")
    if config.world_size > 1:
        notes.append(
            "data-parallel communication buffers (DDP buckets, all-reduce staging) not modelled"
        )
        if config.shard_states:
            notes.append("sharded states modelled as an even split over ranks")
    return notes
