"""Every trainable tensor of a LLaMA as the optimizer sees it (projected at a rank, or dense),
from its config by arithmetic and from the real model on the meta device: the two must agree
(:func:`check_shape_arithmetic`), so the payload arithmetic describes what the code sends."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gnlorp_dist import apply_weight_norm, projected_param_groups
from gnlorp_dist.bench.communication.schemes import model_config, recipe
from gnlorp_dist.models import build_model_on_meta
from gnlorp_dist.optim.projection import low_rank_shape, projection_shape, projection_side

if TYPE_CHECKING:
    from transformers import LlamaConfig


@dataclass(frozen=True)
class TensorShape:
    """One trainable tensor as the optimizer sees it: projected at ``rank`` or dense."""

    name: str
    shape: tuple[int, ...]
    rank: int | None = None  # None: dense (AdamW on the whole tensor)
    proj_type: str = "std"

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def low_rank_numel(self) -> int:
        """Elements of the projected gradient (and of the low-rank direction): ``M x r`` when
        projected on the right, ``r x N`` on the left (GaLore's ``std`` rule)."""
        if self.rank is None:
            return self.numel
        side = projection_side(self.shape, self.proj_type)
        rows, cols = low_rank_shape(self.shape, self.rank, side)
        return rows * cols

    @property
    def basis_numel(self) -> int:
        """Elements of the projection basis (``r x N`` right, ``M x r`` left)."""
        if self.rank is None:
            return 0
        side = projection_side(self.shape, self.proj_type)
        rows, cols = projection_shape(self.shape, self.rank, side)
        return rows * cols


def _layer_matrices(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """One decoder layer's projected matrices, as ``nn.Linear`` weights: (out, in) features."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    q = config.num_attention_heads * head_dim
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def shapes_from_config(config: LlamaConfig, rank: int, weight_norm: bool) -> list[TensorShape]:
    """Every trainable tensor of a LLaMA from its config alone (arithmetic, no model): the
    attention and MLP matrices projected at ``rank``; embeddings, ``lm_head``, norms and, with
    ``weight_norm``, one magnitude per output row of each projected matrix, dense."""
    hidden = config.hidden_size
    matrices = _layer_matrices(config)
    suffix = ".direction" if weight_norm else ".weight"
    out = [TensorShape("model.embed_tokens.weight", (config.vocab_size, hidden))]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, shape in matrices.items():
            out.append(TensorShape(prefix + name + suffix, shape, rank))
            if weight_norm:
                out.append(TensorShape(prefix + name + ".magnitude", (shape[0],)))
        out.append(TensorShape(prefix + "input_layernorm.weight", (hidden,)))
        out.append(TensorShape(prefix + "post_attention_layernorm.weight", (hidden,)))
    out.append(TensorShape("model.norm.weight", (hidden,)))
    if not config.tie_word_embeddings:
        out.append(TensorShape("lm_head.weight", (config.vocab_size, hidden)))
    return out


def shapes_from_model(config: LlamaConfig, rank: int, weight_norm: bool) -> list[TensorShape]:
    """The same from the real model on the meta device and the real ``projected_param_groups``
    (what the optimizer is given), so the arithmetic above is checked against the library."""
    model = build_model_on_meta(config)
    if weight_norm:
        apply_weight_norm(model)
    groups = projected_param_groups(model, rank=rank, update_proj_gap=200, scale=0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        for param in group["params"]:
            out.append(
                TensorShape(
                    names[id(param)],
                    tuple(param.shape),
                    group.get("rank"),
                    group.get("proj_type", "std"),
                )
            )
    return out


def check_shape_arithmetic(models: Iterable[str]) -> None:
    """Assert that :func:`shapes_from_config` equals :func:`shapes_from_model` for every shape
    in ``models`` (names of :data:`~gnlorp_dist.bench.communication.schemes.MODELS`), with
    and without weight normalisation."""
    for name in models:
        config, (rank, _) = model_config(name), recipe(name)
        for weight_norm in (False, True):
            ours = sorted(shapes_from_config(config, rank, weight_norm), key=lambda t: t.name)
            lib = sorted(shapes_from_model(config, rank, weight_norm), key=lambda t: t.name)
            assert ours == lib, f"{name}: shape arithmetic disagrees with the model"
