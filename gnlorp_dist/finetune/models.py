"""Sequence-classification models: built-in tiny ones, a config, a local folder or a hub name;
which of their linear layers GradNormLoRP re-parametrises; and the optimizer.

Only the transformer body (the encoder, and BART's decoder) is weight-normalised and projected:
the classification head (RoBERTa's ``classifier.dense``/``out_proj``, BART's
``classification_head``, BERT's ``classifier``) and BERT's pooler stay dense and train with
plain AdamW, as in GaLore's GLUE runs. Surgery is therefore applied to the body's modules, not
to the whole model: the heads reuse the names ``dense`` and ``out_proj`` of the body's layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig
from transformers.utils import logging as hf_logging

from gnlorp_dist.data.corpus import looks_like_hub_id
from gnlorp_dist.nn import apply_weight_norm
from gnlorp_dist.nn.wegeft import apply_wegeft
from gnlorp_dist.optim import GradNormLoRPAdamW, projected_param_groups

_TINY_SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "ffn": 256}
TINY_MODELS = ("tiny-roberta", "tiny-bert", "tiny-bart")
"""Built-in from-scratch models (hidden 64, 2 layers, 4 heads, FFN 256): offline smoke runs."""

# Linear layers of the body, per architecture. BERT and RoBERTa name their attention output,
# intermediate and output projections all "dense"; BART names its attention output "out_proj".
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "dense"),
    "roberta": ("query", "key", "value", "dense"),
    "xlm-roberta": ("query", "key", "value", "dense"),
    "camembert": ("query", "key", "value", "dense"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "mbart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
# Children of the base model that belong to the task head in spirit: kept dense.
_HEAD_LIKE_CHILDREN = ("pooler",)
# Position ids of these architectures start after the padding index.
_PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")


# -------------------------------------------------------------------------------- configs


def tiny_config(name: str, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """The config of a built-in tiny model, sized for ``max_seq_len`` tokens."""
    s = _TINY_SHAPE
    if name == "tiny-roberta":
        return AutoConfig.for_model(
            "roberta", vocab_size=vocab_size, hidden_size=s["hidden"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["ffn"], max_position_embeddings=max_seq_len + 2,
            type_vocab_size=1,
        )  # fmt: skip
    if name == "tiny-bert":
        return AutoConfig.for_model(
            "bert", vocab_size=vocab_size, hidden_size=s["hidden"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["ffn"], max_position_embeddings=max_seq_len,
        )  # fmt: skip
    if name == "tiny-bart":
        return AutoConfig.for_model(
            "bart", vocab_size=vocab_size, d_model=s["hidden"], encoder_layers=s["layers"],
            decoder_layers=s["layers"], encoder_attention_heads=s["heads"],
            decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"],
            decoder_ffn_dim=s["ffn"], max_position_embeddings=max_seq_len,
        )  # fmt: skip
    raise ValueError(f"unknown built-in model {name!r}; choose one of {TINY_MODELS}")


def config_from_json(path: str) -> PretrainedConfig:
    """A transformers config from a ``config.json`` (or a folder holding one)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ValueError(f"--model-config {path!r} does not exist")
    data = json.loads(file.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f'--model-config {path!r} has no \'model_type\' (e.g. "roberta", "bert", "bart")'
        )
    for key in ("id2label", "label2id", "num_labels", "problem_type", "architectures"):
        data.pop(key, None)  # set from the data instead
    return AutoConfig.for_model(model_type, **data)


def model_source(model: str, model_config: str | None) -> str:
    """``builtin``, ``config`` (random init), ``local`` (a folder with weights) or ``hub``."""
    if model_config is not None:
        return "config"
    if model in TINY_MODELS:
        return "builtin"
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--model {model!r} is not a model folder (no config.json); pass a folder saved "
                "by save_pretrained, or a config with --model-config"
            )
        weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
        if not weights:
            raise ValueError(
                f"--model {model!r} holds a config.json but no weights (*.safetensors, *.bin); "
                f"to train that architecture from scratch use --model-config {model}"
            )
        return "local"
    if looks_like_hub_id(model) and not model.startswith((".", "~")):
        return "hub"
    raise ValueError(
        f"--model {model!r} is neither a built-in model ({', '.join(TINY_MODELS)}), an existing "
        "folder, nor a hub name"
    )


def max_tokens(config: PretrainedConfig) -> int | None:
    """The longest sequence ``config``'s position embeddings hold (None: unbounded)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    if config.model_type in _PADDING_OFFSET_MODEL_TYPES:
        return positions - (config.pad_token_id or 0) - 1
    return positions


def label_kwargs(num_labels: int, regression: bool, names: list[str]) -> dict[str, Any]:
    """Config fields describing the label space (saved with the model)."""
    if regression:
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": num_labels,
        "problem_type": "single_label_classification",
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def build_from_config(config: PretrainedConfig, tokenizer: Any, seed: int) -> nn.Module:
    """A randomly initialised model whose special-token ids and vocabulary fit ``tokenizer``."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}; raise vocab_size in the config or lower --vocab-size"
        )
    # RoBERTa derives position ids from the padding index and BART pools the last eos token:
    # both must be the tokenizer's ids.
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
        if config.model_type in ("bart", "mbart"):
            config.decoder_start_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def load_pretrained(name_or_path: str, labels: dict[str, Any], local: bool) -> nn.Module:
    """Pre-trained weights with a fresh head sized for the labels (hub: online)."""
    config = AutoConfig.from_pretrained(name_or_path, local_files_only=local, **labels)
    hf_logging.disable_progress_bar()  # a per-tensor bar; the hub download keeps its own
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name_or_path, config=config, local_files_only=local, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------- surgery


def target_modules_for(config: PretrainedConfig, requested: tuple[str, ...] | None) -> tuple:
    if requested:
        return requested
    if config.model_type not in TARGET_MODULES:
        raise ValueError(
            f"no default target modules for model type {config.model_type!r} (known: "
            f"{', '.join(TARGET_MODULES)}); name the body's linear layers with --target-modules, "
            "e.g. --target-modules query,key,value,dense"
        )
    return TARGET_MODULES[config.model_type]


def body_parts(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of each child of the base model (pooler excluded) holding
    a linear layer named in ``targets``: what surgery and projection apply to."""
    base = model.base_model
    prefix = model.base_model_prefix if base is not model else ""
    parts = []
    for name, child in base.named_children():
        if name in _HEAD_LIKE_CHILDREN:
            continue
        if any(
            isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
            for n, m in child.named_modules()
        ):
            parts.append((f"{prefix}.{name}" if prefix else name, child))
    if not parts:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"--target-modules {','.join(targets)} matched no linear layer of the "
            f"{type(model).__name__} body; its linear layers are named {linear}"
        )
    return parts


def prepare_for_training(
    model: nn.Module,
    *,
    optimizer: str,
    targets: tuple[str, ...],
    lora_rank: int | None,
    lora_alpha: float | None,
    detach_norm: bool,
    wegeft_rank: int | None = None,
    wegeft_alpha: float | None = None,
    wegeft_shared: bool = False,
    wegeft_dropout: float = 0.0,
) -> list[tuple[str, nn.Module]]:
    """Weight-normalise the body for gradnormlorp and, in LoRA mode, freeze everything but the
    adapters, the magnitudes and the head; for wegeft, freeze everything but the head and wrap
    the body's targets in WeGeFT layers (their generators train). Returns the body parts (see
    :func:`body_parts`)."""
    parts = body_parts(model, targets)
    if optimizer == "wegeft":
        _freeze_all_but_head(model)
        for _, part in parts:
            apply_wegeft(
                part,
                targets,
                rank=wegeft_rank or 8,
                alpha=wegeft_alpha,
                shared=wegeft_shared,
                dropout=wegeft_dropout,
            )
        return parts
    if optimizer != "gradnormlorp":
        return parts
    if lora_rank is not None:
        _freeze_all_but_head(model)
    for _, part in parts:
        apply_weight_norm(
            part, targets, lora_rank=lora_rank, lora_alpha=lora_alpha, detach_norm=detach_norm
        )
    return parts


def _freeze_all_but_head(model: nn.Module) -> None:
    head_prefixes = tuple(f"{n}." for n, _ in _head_modules(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(head_prefixes))


def _head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children that are not the base model: the classification head."""
    return [(n, m) for n, m in model.named_children() if m is not model.base_model]


def param_groups(
    model: nn.Module,
    parts: list[tuple[str, nn.Module]],
    targets: tuple[str, ...],
    *,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
) -> list[dict[str, Any]]:
    """[projected matrices of the body, every other trainable parameter] for
    :class:`GradNormLoRPAdamW`, built with :func:`projected_param_groups` on the body only so
    that the head's ``dense``/``out_proj`` stay dense."""
    projected, names = [], []
    for prefix, part in parts:
        group = projected_param_groups(
            part, rank, update_proj_gap, scale, proj_type, target_modules=targets
        )[0]
        projected += group["params"]
        names += [f"{prefix}.{n}" for n in group["param_names"]]
    chosen = {id(p) for p in projected}
    dense = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in chosen]
    groups: list[dict[str, Any]] = [
        {
            "params": projected,
            "param_names": names,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
        }
    ]
    if dense:
        groups.append({"params": [p for _, p in dense], "param_names": [n for n, _ in dense]})
    return groups


def build_optimizer(
    model: nn.Module,
    parts: list[tuple[str, nn.Module]],
    targets: tuple[str, ...],
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
    bits: int,
) -> torch.optim.Optimizer:
    """GradNormLoRPAdamW over the body's projected matrices + dense rest, or torch's AdamW
    (adamw: every parameter; wegeft: the generators and the head, all that trains)."""
    if optimizer in ("adamw", "wegeft"):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=weight_decay)
    groups = param_groups(
        model,
        parts,
        targets,
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
    )
    return GradNormLoRPAdamW(groups, lr=lr, weight_decay=weight_decay, bits=bits)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
