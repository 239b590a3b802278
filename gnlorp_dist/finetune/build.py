"""Turn a :class:`FinetuneConfig` into everything a run holds: data, tokenizer, model,
optimizer and schedule. Every user mistake raises ValueError here, before any training."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from gnlorp_dist.device import activate_device, resolve_device
from gnlorp_dist.finetune.config import FinetuneConfig, resolve, split_names
from gnlorp_dist.finetune.data import (
    GLUE_TASKS,
    EncodedSplit,
    RawData,
    encode_split,
    load_raw_data,
    training_texts,
)
from gnlorp_dist.finetune.metrics import default_metric_names, parse_metric_names
from gnlorp_dist.finetune.models import (
    build_from_config,
    build_optimizer,
    config_from_json,
    label_kwargs,
    load_pretrained,
    max_tokens,
    model_source,
    prepare_for_training,
    target_modules_for,
    tiny_config,
)
from gnlorp_dist.finetune.tokenizer import (
    build_word_level_tokenizer,
    has_tokenizer_files,
    load_pretrained_tokenizer,
)

SMALL_MODEL_HIDDEN = 256
"""Below this hidden size one CPU thread is the default: more only add synchronisation."""


@dataclass(kw_only=True)
class FinetuneRun:
    """A run ready to train (built by :func:`prepare`)."""

    config: FinetuneConfig
    """Resolved: recipe defaults filled in."""
    raw: RawData
    tokenizer: Any
    tokenizer_source: str
    """Where the tokenizer came from (for the log)."""
    model: nn.Module
    model_source: str
    """builtin, config, local or hub."""
    targets: tuple[str, ...]
    """Linear-layer names normalised / projected in the body."""
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    train: EncodedSplit
    validation: EncodedSplit
    metric_names: tuple[str, ...]
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    device: torch.device


def _hidden_size(config: Any) -> int:
    """The model width (BERT/RoBERTa ``hidden_size``, BART ``d_model``); unknown counts as big."""
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    return int(width) if width else SMALL_MODEL_HIDDEN


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """Linear warmup to the peak lr over ``warmup`` steps, then linear decay towards 0 at
    ``total`` (the schedule of RoBERTa's and GaLore's GLUE runs)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)


def check_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard (or pip install 'gnlorp-dist[tensorboard]'), or drop "
            "--tensorboard"
        )


def _tokenizer_for(
    config: FinetuneConfig, source: str, raw: RawData, model_config: Any
) -> tuple[Any, str]:
    if config.tokenizer is not None:
        return load_pretrained_tokenizer(config.tokenizer), config.tokenizer
    if source in ("local", "hub"):
        if source == "local" and not has_tokenizer_files(Path(config.model).expanduser()):
            raise ValueError(
                f"--model {config.model!r} holds no tokenizer files; pass --tokenizer with the "
                "tokenizer the model was trained with"
            )
        return load_pretrained_tokenizer(config.model), config.model
    tokenizer = build_word_level_tokenizer(
        training_texts(raw),
        model_type=model_config.model_type,
        # A --model-config fixes the embedding size; the built-ins are sized to the tokenizer.
        vocab_size=(
            config.vocab_size
            if source == "builtin"
            else min(config.vocab_size, model_config.vocab_size)
        ),
        max_length=config.max_seq_len,
    )
    return tokenizer, f"word-level, learnt from the training split ({len(tokenizer)} tokens)"


def _load_data(config: FinetuneConfig) -> RawData:
    return load_raw_data(
        task=config.task,
        train_file=config.train_file,
        validation_file=config.validation_file,
        validation_fraction=config.validation_fraction,
        text_columns=split_names(config.text_columns),
        label_column=config.label_column,
        problem_type=config.problem_type,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        seed=config.seed,
    )


def _metric_names(config: FinetuneConfig, raw: RawData) -> tuple[str, ...]:
    """``--metric`` if given, else the GLUE task's metrics, else the defaults for the labels."""
    regression = raw.labels.regression
    if config.metric is not None:
        return parse_metric_names(config.metric, regression)
    if config.task is not None:
        return GLUE_TASKS[config.task].metrics
    return default_metric_names(regression, raw.labels.num_labels)


def _random_init_config(config: FinetuneConfig, source: str) -> Any:
    """The architecture of a random-init model (built-in or ``--model-config``); None for
    pre-trained weights, whose config comes with them."""
    if source == "builtin":
        return tiny_config(config.model, config.vocab_size, config.max_seq_len)
    if source == "config":
        return config_from_json(config.model_config)
    return None


def _ensure_pad_token(tokenizer: Any, tokenizer_source: str) -> None:
    """Batches need a pad token: a tokenizer without one pads with its eos token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer_source!r} has neither a pad nor an eos token; pass "
                "--tokenizer with one that can pad"
            )
        tokenizer.pad_token = tokenizer.eos_token


def _build_model(
    config: FinetuneConfig,
    source: str,
    model_config: Any,
    raw: RawData,
    tokenizer: Any,
    tokenizer_source: str,
) -> nn.Module:
    """The sequence classifier with a head for ``raw``'s labels: random init from
    ``model_config`` (the built-ins' vocabulary sized to the tokenizer), else the pre-trained
    weights, whose embeddings must cover the tokenizer."""
    labels = label_kwargs(raw.labels.num_labels, raw.labels.regression, raw.labels.names)
    if model_config is not None:
        if source == "builtin":
            model_config.vocab_size = len(tokenizer)
        for key, value in labels.items():
            setattr(model_config, key, value)
        return build_from_config(model_config, tokenizer, config.seed)
    model = load_pretrained(config.model, labels, local=source == "local")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_source!r} has {len(tokenizer)} tokens but the model "
            f"{config.model!r} embeds only {model.config.vocab_size}; pass --tokenizer with "
            "the model's own tokenizer"
        )
    return model


def _check_max_seq_len(config: FinetuneConfig, model: nn.Module) -> None:
    limit = max_tokens(model.config)
    if limit is not None and config.max_seq_len > limit:
        raise ValueError(
            f"--max-seq-len {config.max_seq_len} exceeds the {limit} positions of the model; "
            f"use --max-seq-len {limit} or less"
        )


def _adapt_model(
    config: FinetuneConfig, model: nn.Module, targets: tuple[str, ...]
) -> list[tuple[str, nn.Module]]:
    """The method's surgery on the body (weight norm, LoRA, WeGeFT or none); returns the
    parts :func:`build_optimizer` groups."""
    return prepare_for_training(
        model,
        optimizer=config.optimizer,
        targets=targets,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        detach_norm=config.detach_norm,
        wegeft_rank=config.wegeft_rank,
        wegeft_alpha=config.wegeft_alpha,
        wegeft_shared=config.wegeft_shared,
        wegeft_dropout=config.wegeft_dropout,
    )


def _optimizer(
    config: FinetuneConfig,
    model: nn.Module,
    parts: list[tuple[str, nn.Module]],
    targets: tuple[str, ...],
) -> torch.optim.Optimizer:
    return build_optimizer(
        model,
        parts,
        targets,
        optimizer=config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
        rank=config.rank,
        update_proj_gap=config.update_proj_gap,
        scale=config.scale,
        proj_type=config.proj_type,
        bits=config.bits,
    )


def _encode(
    config: FinetuneConfig, tokenizer: Any, raw: RawData
) -> tuple[EncodedSplit, EncodedSplit]:
    """The training and validation splits as token ids."""
    train = encode_split(
        tokenizer, raw.train, raw.text_columns, raw.train_labels, config.max_seq_len
    )
    validation = encode_split(
        tokenizer, raw.validation, raw.text_columns, raw.validation_labels, config.max_seq_len
    )
    return train, validation


def prepare(config: FinetuneConfig) -> FinetuneRun:
    """Resolve ``config`` and build the run. Raises ValueError on any user mistake."""
    config = resolve(config)
    if config.tensorboard:
        check_tensorboard()
    source = model_source(config.model, config.model_config)
    seed_everything(config.seed)
    raw = _load_data(config)
    metric_names = _metric_names(config, raw)
    model_config = _random_init_config(config, source)
    tokenizer, tokenizer_source = _tokenizer_for(config, source, raw, model_config)
    _ensure_pad_token(tokenizer, tokenizer_source)
    model = _build_model(config, source, model_config, raw, tokenizer, tokenizer_source)
    _check_max_seq_len(config, model)
    if config.threads is None and _hidden_size(model.config) < SMALL_MODEL_HIDDEN:
        config = dataclasses.replace(config, threads=1)

    targets = target_modules_for(model.config, split_names(config.target_modules))
    parts = _adapt_model(config, model, targets)
    device = resolve_device(config.device)
    activate_device(device, tf32=config.tf32)  # set_device before the first GPU allocation
    model.to(device)
    optimizer = _optimizer(config, model, parts, targets)
    train, validation = _encode(config, tokenizer, raw)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or config.epochs * steps_per_epoch
    warmup = round(config.warmup_ratio * total)
    return FinetuneRun(
        config=config,
        raw=raw,
        tokenizer=tokenizer,
        tokenizer_source=tokenizer_source,
        model=model,
        model_source=source,
        targets=targets,
        optimizer=optimizer,
        scheduler=linear_schedule(optimizer, warmup, total),
        train=train,
        validation=validation,
        metric_names=metric_names,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup,
        device=device,
    )
