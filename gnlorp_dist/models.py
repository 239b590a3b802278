"""LLaMA model shapes and training recipes by name, mapped to ``transformers`` explicitly.

The named shapes and recipes are GaLore's (design spec, section 5); ``llama_nano`` and
``llama_micro`` are small enough to pre-train on a CPU in minutes. Feeding GaLore's JSON
straight into ``transformers.LlamaConfig`` goes wrong three ways (``max_sequence_length`` is
ignored, ``pad_token_id=-1`` becomes padding index 31999, bos/eos 0/1 do not match a LLaMA
tokenizer), so every config here is built field by field. Nothing in this module touches the
network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_VOCAB_SIZE = 32000
LLAMA_BOS_TOKEN_ID = 1
LLAMA_EOS_TOKEN_ID = 2


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A LLaMA shape plus the GaLore/GradNormLoRP recipe that goes with it."""

    name: str
    """Registry name, e.g. ``"llama_60m"``."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """SwiGLU MLP width."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Attention heads (no grouped-query attention: key/value heads equal this)."""
    max_seq_len: int
    """Longest sequence the model is configured for (``max_position_embeddings``)."""
    rank: int
    """Projection rank r of the low-rank gradient."""
    update_proj_gap: int
    """Subspace refresh gap T, in optimizer steps."""
    scale: float
    """Scale alpha applied to the projected update."""
    lr: float
    """Peak learning rate for the projected optimizers (gradnormlorp, galore)."""
    grad_clip: float | None = None
    """Gradient-norm clip of the reference recipe, where it names one (7B: 1.0)."""
    vocab_size: int = LLAMA_VOCAB_SIZE
    """Vocabulary size (a LLaMA SentencePiece tokenizer has 32000 pieces)."""


def _spec(name: str, hidden: int, inter: int, layers: int, heads: int, seq: int, rank: int,
          gap: int, scale: float, lr: float, clip: float | None = None) -> ModelSpec:  # fmt: skip
    return ModelSpec(
        name=name, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, max_seq_len=seq, rank=rank, update_proj_gap=gap, scale=scale, lr=lr,
        grad_clip=clip,
    )  # fmt: skip


MODEL_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        # name          hidden inter  layers heads seq   rank  T    alpha lr
        _spec("llama_nano", 128, 352, 2, 4, 256, 32, 50, 0.25, 0.01),
        _spec("llama_micro", 256, 688, 4, 4, 256, 64, 100, 0.25, 0.01),
        _spec("llama_60m", 512, 1376, 8, 8, 1024, 128, 200, 0.25, 0.01),
        _spec("llama_130m", 768, 2048, 12, 12, 1024, 256, 200, 0.25, 0.01),
        _spec("llama_350m", 1024, 2736, 24, 16, 1024, 256, 200, 0.25, 0.01),
        _spec("llama_1b", 2048, 5461, 24, 32, 1024, 1024, 200, 0.25, 0.01),
        _spec("llama_7b", 4096, 11008, 32, 32, 2048, 1024, 500, 0.25, 0.005, clip=1.0),
    )
}

# Recipe for a config given by path whose shape matches no named spec: GaLore's 60M numbers,
# with the rank capped at a quarter of the width (60M: 512 / 4 = 128).
_FALLBACK_UPDATE_PROJ_GAP = 200
_FALLBACK_SCALE = 0.25
_FALLBACK_LR = 0.01


def known_model_names() -> list[str]:
    """Names accepted by :func:`model_spec` and :func:`llama_config`, smallest first."""
    return list(MODEL_SPECS)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``; ValueError listing the known names."""
    if name not in MODEL_SPECS:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_SPECS)} "
            "(or pass a config JSON path with --model-config)"
        )
    return MODEL_SPECS[name]


def config_from_spec(spec: ModelSpec) -> LlamaConfig:
    """The ``transformers.LlamaConfig`` for a named shape."""
    return _llama_config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_seq_len,
    )


def _llama_config(**fields: Any) -> LlamaConfig:
    defaults = dict(
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        # A LLaMA tokenizer's ids; pad None so no embedding row is a frozen padding index.
        pad_token_id=None,
        bos_token_id=LLAMA_BOS_TOKEN_ID,
        eos_token_id=LLAMA_EOS_TOKEN_ID,
    )
    defaults.update(fields)
    config = LlamaConfig(**defaults)
    config.architectures = ["LlamaForCausalLM"]
    return config


def is_galore_style(raw: dict[str, Any]) -> bool:
    """Whether a config dict is in GaLore's (transformers 4.28-era) layout."""
    return "max_sequence_length" in raw or raw.get("architectures") == ["LLaMAForCausalLM"]


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> LlamaConfig:
    """Map a GaLore-style or Hugging Face ``config.json`` dict to a ``LlamaConfig``.

    GaLore-style dicts (they carry ``max_sequence_length``) get the LLaMA tokenizer's bos/eos
    1/2; a Hugging Face dict keeps its own ids. A negative ``pad_token_id`` becomes None in both.
    """
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; only 'llama'")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{source}: config is missing {', '.join(missing)}")
    galore = is_galore_style(raw)
    max_pos = raw.get("max_position_embeddings", raw.get("max_sequence_length"))
    if max_pos is None:
        raise ValueError(f"{source}: needs max_position_embeddings or max_sequence_length")
    pad = raw.get("pad_token_id")
    if pad is not None and pad < 0:
        pad = None
    fields: dict[str, Any] = dict(
        vocab_size=int(raw.get("vocab_size", LLAMA_VOCAB_SIZE)),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        num_key_value_heads=raw.get("num_key_value_heads"),
        max_position_embeddings=int(max_pos),
        hidden_act=raw.get("hidden_act", "silu"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        initializer_range=float(raw.get("initializer_range", 0.02)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        pad_token_id=pad,
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
    )
    if not galore:
        fields["bos_token_id"] = raw.get("bos_token_id", LLAMA_BOS_TOKEN_ID)
        fields["eos_token_id"] = raw.get("eos_token_id", LLAMA_EOS_TOKEN_ID)
        for key in ("head_dim", "rope_parameters"):
            if raw.get(key) is not None:
                fields[key] = raw[key]
        if raw.get("rope_theta") is not None and "rope_parameters" not in fields:
            fields["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    return _llama_config(**fields)


def llama_config(name_or_path: str | os.PathLike) -> LlamaConfig:
    """A ``LlamaConfig`` from a registered name, a JSON file, or a folder holding config.json."""
    text = str(name_or_path)
    if text in MODEL_SPECS:
        return config_from_spec(MODEL_SPECS[text])
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"model config {str(path)!r} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"model config {str(path)!r} must hold a JSON object")
        return config_from_dict(raw, source=str(path))
    if text.endswith(".json") or os.sep in text:
        raise ValueError(f"model config file {text!r} not found")
    return config_from_spec(model_spec(text))  # model_spec raises, listing the known names


def recipe_for_config(config: LlamaConfig) -> ModelSpec:
    """The named spec whose shape equals ``config``'s, or a fallback recipe for other shapes."""
    for spec in MODEL_SPECS.values():
        if (
            spec.hidden_size == config.hidden_size
            and spec.intermediate_size == config.intermediate_size
            and spec.num_layers == config.num_hidden_layers
            and spec.num_heads == config.num_attention_heads
        ):
            return spec
    return ModelSpec(
        name="custom",
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        max_seq_len=config.max_position_embeddings,
        rank=max(1, min(config.hidden_size // 4, 1024)),
        update_proj_gap=_FALLBACK_UPDATE_PROJ_GAP,
        scale=_FALLBACK_SCALE,
        lr=_FALLBACK_LR,
        vocab_size=config.vocab_size,
    )


def build_model_on_meta(config: LlamaConfig) -> LlamaForCausalLM:
    """The model with every tensor on the meta device: shapes only, no memory, no init."""
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(
    config: LlamaConfig,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    """A freshly initialised model on ``device``, the same weights for the same seed and device.

    On the CPU the model is initialised in fp32 and cast. Elsewhere it is created on the device
    in ``dtype`` directly, so a 7B model never exists in fp32 (27 GB) on the host or the GPU.
    """
    device = torch.device(device)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        return model.to(dtype)
    previous_dtype = torch.get_default_dtype()
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous_dtype)
    return model.to(dtype)
