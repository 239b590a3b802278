"""The configuration of a ``gnlorp-finetune`` run, and its command line.

:class:`FinetuneConfig` takes the model and device groups of :mod:`gnlorp_dist.options` and the
fields it shares with the other CLIs (rank, lr, batch size, ...: same flag, same help), plus its
own (task, data files, WeGeFT). Every field is one flag (``max_seq_len`` -> ``--max-seq-len``)
whose help text is the docstring under the field (:func:`gnlorp_dist.options.parser.
build_parser`; ``--config FILE`` reads them from YAML or JSON). Fields left ``None`` are filled
by :func:`resolve` from one of two recipes:

- pre-trained weights (a local folder or a hub name): GaLore's GLUE recipe for RoBERTa-base,
  rank 8, refresh gap T = 500, scale 4, lr 3e-5 (AdamW baseline: 2e-5, the usual RoBERTa
  fine-tuning lr; WeGeFT: 4e-4, LoRA's RoBERTa-base lr), 3 epochs;
- random init (``tiny-*`` built-ins, ``--model-config``): a model trained from scratch on a
  small dataset needs a far larger lr and a shorter gap, so rank 8, T = 50, scale 1, lr 2e-3
  (AdamW 1e-3, WeGeFT 2e-3), 10 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gnlorp_dist.device import resolve_device
from gnlorp_dist.finetune.data import GLUE_TASKS
from gnlorp_dist.finetune.metrics import METRIC_NAMES
from gnlorp_dist.finetune.models import TINY_MODELS
from gnlorp_dist.options.fields import option, shared
from gnlorp_dist.options.groups import (
    DataOptions,
    LoopOptions,
    MethodOptions,
    ModelOptions,
    RuntimeOptions,
    ScheduleOptions,
)
from gnlorp_dist.options.optimizer import (
    PROJ_TYPES,
    MomentOptions,
    ProjectionOptions,
    projection_rank,
)
from gnlorp_dist.options.parser import build_parser as build_options_parser
from gnlorp_dist.options.parser import config_from_namespace, parse_namespace

OPTIMIZERS = ("gradnormlorp", "galore", "adamw", "wegeft")
WEGEFT_DEFAULT_RANK = 8
PROBLEM_TYPES = ("auto", "classification", "regression")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    rank: int
    update_proj_gap: int
    scale: float
    lr: float
    adamw_lr: float
    wegeft_lr: float
    epochs: int


# wegeft_lr (pre-trained): LoRA's RoBERTa-base GLUE lr (4e-4 to 5e-4), a starting point for a
# frozen body with small trained updates, not a value tuned for WeGeFT here.
PRETRAINED_RECIPE = Recipe(
    rank=8, update_proj_gap=500, scale=4.0, lr=3e-5, adamw_lr=2e-5, wegeft_lr=4e-4, epochs=3
)
FROM_SCRATCH_RECIPE = Recipe(
    rank=8, update_proj_gap=50, scale=1.0, lr=2e-3, adamw_lr=1e-3, wegeft_lr=2e-3, epochs=10
)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(RuntimeOptions, ModelOptions):
    """One fine-tuning run. Defaults: GradNormLoRP (full mode) on tiny-roberta, from scratch."""

    model: str = "tiny-roberta"
    tokenizer: str | None = shared(DataOptions, "tokenizer")
    target_modules: str | None = option(None, metavar="NAMES")
    """Comma-separated names of the body's linear layers to normalise and project (default
    per architecture: query,key,value,dense for BERT/RoBERTa;
    q_proj,k_proj,v_proj,out_proj,fc1,fc2 for BART)."""
    task: str | None = option(None, choices=tuple(GLUE_TASKS))
    """A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): its columns and
    metrics; without --train-file its data is downloaded from the hub (nyu-mll/glue)."""
    train_file: str | None = option(None, metavar="PATH")
    """Local training data: .csv, .tsv, .json or .jsonl with a header / keys."""
    validation_file: str | None = option(None, metavar="PATH")
    """Local validation data (default: --validation-fraction of the training file)."""
    validation_fraction: float = 0.1
    """Share of the training file held out for validation when there is no validation file."""
    text_columns: str | None = option(None, metavar="COL[,COL2]", aliases=["--text-column"])
    """Text column, or two comma-separated columns for sentence pairs (default: the task's, or
    the first of sentence1,sentence2 / sentence / text found)."""
    label_column: str = option("label", metavar="COL")
    """Column holding the label (a class id, a class name, or a float score)."""
    problem_type: str = option("auto", choices=PROBLEM_TYPES)
    """auto (float labels: regression, else classification), classification or regression."""
    metric: str | None = option(None, metavar="NAMES")
    """Comma-separated metrics: accuracy, f1, matthews, pearson, spearman (default: GLUE's for
    the task; else pearson,spearman for regression, accuracy,f1,matthews for two classes)."""
    max_train_samples: int = 0
    """Use only the first N training examples (0: all)."""
    max_eval_samples: int = 0
    """Use only the first N validation examples (0: all)."""
    max_seq_len: int = 128
    """Tokens per example (longer ones are truncated)."""
    vocab_size: int = 8000
    """Size cap of the word-level tokenizer learnt for random-init models."""
    optimizer: str = shared(MethodOptions, "optimizer", choices=OPTIMIZERS, aliases=["--method"])
    rank: int | None = shared(ProjectionOptions, "rank")
    update_proj_gap: int | None = shared(ProjectionOptions, "update_proj_gap")
    scale: float | None = shared(ProjectionOptions, "scale")
    proj_type: str = shared(ProjectionOptions, "proj_type", choices=PROJ_TYPES)
    lora_rank: int | None = shared(MethodOptions, "lora_rank")
    lora_alpha: float | None = shared(MethodOptions, "lora_alpha")
    detach_norm: bool = shared(MethodOptions, "detach_norm")
    wegeft_rank: int | None = None
    """wegeft only: rank r of the generator (phi, psi of shape r x in; default 8)."""
    wegeft_alpha: float | None = None
    """wegeft only: scaling numerator (s = alpha / r; default alpha = r)."""
    wegeft_shared: bool = False
    """wegeft only: one generator per projection type shared by all blocks (the authors'
    tied modules) instead of one per layer."""
    wegeft_dropout: float = 0.0
    """wegeft only: dropout on W0 inside the generator while training."""
    bits: int = shared(MomentOptions, "bits")
    lr: float | None = shared(ScheduleOptions, "lr")
    weight_decay: float = shared(ScheduleOptions, "weight_decay")
    warmup_ratio: float = 0.06
    """Share of the steps with linear warmup (RoBERTa's GLUE recipe); then linear decay to 0."""
    epochs: int | None = None
    """Passes over the training data (default: 3 pre-trained, 10 random init)."""
    max_steps: int = shared(LoopOptions, "max_steps", default=0)
    batch_size: int = shared(DataOptions, "batch_size", default=16)
    grad_clip: float = shared(ScheduleOptions, "grad_clip")
    eval_every: int = shared(LoopOptions, "eval_every")
    log_every: int = shared(LoopOptions, "log_every")
    output_dir: str | None = shared(LoopOptions, "output_dir")
    tensorboard: bool = shared(LoopOptions, "tensorboard")
    threads: int | None = shared(LoopOptions, "threads")
    seed: int = shared(DataOptions, "seed")


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`FinetuneConfig` field, helped by its docstring."""
    return build_options_parser(
        FinetuneConfig,
        prog="gnlorp-finetune",
        description="Fine-tune a sequence classifier (RoBERTa, BERT, BART) with GradNormLoRP, "
        "GaLore, AdamW or WeGeFT on a GLUE task or local CSV/JSON files, then save the merged "
        "model.",
    )


def config_from_args(argv: list[str] | None = None) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a command line (``--config FILE`` under its flags)."""
    return config_from_namespace(FinetuneConfig, parse_namespace(build_parser(), argv))


def split_names(text: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` -> ``("a", "b")``; None stays None."""
    if text is None:
        return None
    return tuple(n.strip() for n in text.split(",") if n.strip())


def is_from_scratch(config: FinetuneConfig) -> bool:
    return config.model_config is not None or config.model in TINY_MODELS


def _check_choice(value: object, choices: tuple, flag: str) -> None:
    if value not in choices:
        raise ValueError(
            f"{flag} {value!r} is unknown; choose one of {', '.join(map(str, choices))}"
        )


def _check_methods(config: FinetuneConfig) -> None:
    """Known choices, and each method's flags only with that method."""
    _check_choice(config.optimizer, OPTIMIZERS, "--optimizer")
    _check_choice(config.proj_type, PROJ_TYPES, "--proj-type")
    _check_choice(config.bits, (32, 8), "--bits")
    _check_choice(config.problem_type, PROBLEM_TYPES, "--problem-type")
    resolve_device(config.device)  # --device cuda on a host without one fails before any work
    if config.task is not None:
        _check_choice(config.task, tuple(GLUE_TASKS), "--task")
    if config.optimizer != "gradnormlorp" and (
        config.lora_rank is not None or config.detach_norm or config.lora_alpha is not None
    ):
        raise ValueError(
            "--lora-rank, --lora-alpha and --detach-norm need weight normalisation, i.e. "
            f"--optimizer gradnormlorp; got --optimizer {config.optimizer}"
        )
    if config.optimizer != "wegeft" and (
        config.wegeft_rank is not None
        or config.wegeft_alpha is not None
        or config.wegeft_shared
        or config.wegeft_dropout
    ):
        raise ValueError(
            "--wegeft-rank, --wegeft-alpha, --wegeft-shared and --wegeft-dropout need "
            f"--optimizer wegeft; got --optimizer {config.optimizer}"
        )
    if not 0.0 <= config.wegeft_dropout < 1.0:
        raise ValueError(f"--wegeft-dropout must be in [0, 1), got {config.wegeft_dropout}")
    if config.lora_alpha is not None and config.lora_rank is None:
        raise ValueError(f"--lora-alpha {config.lora_alpha} needs --lora-rank")
    if config.optimizer in ("adamw", "wegeft") and config.bits != 32:
        raise ValueError(
            f"--bits {config.bits} needs a projected optimizer (gradnormlorp or galore); "
            f"got --optimizer {config.optimizer}"
        )


_POSITIVE_OR_NONE = (
    "rank", "update_proj_gap", "scale", "lr", "epochs", "lora_rank", "lora_alpha",
    "wegeft_rank", "wegeft_alpha", "threads",
)  # fmt: skip
_POSITIVE = ("batch_size", "max_seq_len", "log_every", "vocab_size")
_NON_NEGATIVE = (
    "max_steps", "eval_every", "weight_decay", "grad_clip", "max_train_samples",
    "max_eval_samples",
)  # fmt: skip


def _check_numbers(config: FinetuneConfig) -> None:
    """Counts, rates and shares in range; metric names known."""
    for name in _POSITIVE_OR_NONE + _POSITIVE:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}"
            )
    if not 0.0 < config.validation_fraction < 1.0:
        raise ValueError(
            f"--validation-fraction must be in (0, 1), got {config.validation_fraction}"
        )
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.metric is not None:
        unknown = [m for m in split_names(config.metric) or () if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(
                f"--metric {unknown[0]!r} is unknown; choose from {', '.join(METRIC_NAMES)}"
            )


def _with_recipe(config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with the fields left None filled from its recipe."""
    recipe = FROM_SCRATCH_RECIPE if is_from_scratch(config) else PRETRAINED_RECIPE
    rank = projection_rank(config.rank, config.lora_rank, recipe.rank)
    default_lr = {"adamw": recipe.adamw_lr, "wegeft": recipe.wegeft_lr}.get(
        config.optimizer, recipe.lr
    )
    return dataclasses.replace(
        config,
        rank=rank,
        update_proj_gap=config.update_proj_gap or recipe.update_proj_gap,
        scale=config.scale if config.scale is not None else recipe.scale,
        lr=config.lr if config.lr is not None else default_lr,
        epochs=config.epochs or recipe.epochs,
        wegeft_rank=(
            (config.wegeft_rank or WEGEFT_DEFAULT_RANK) if config.optimizer == "wegeft" else None
        ),
        output_dir=config.output_dir or str(Path("runs") / f"finetune-{_run_label(config)}"),
    )


def resolve(config: FinetuneConfig) -> FinetuneConfig:
    """Check ``config`` and fill its recipe defaults. User mistakes raise ValueError."""
    _check_methods(config)
    _check_numbers(config)
    return _with_recipe(config)


def _run_label(config: FinetuneConfig) -> str:
    if config.train_file is not None:
        data = Path(config.train_file).stem
    else:
        data = config.task or "data"
    model = Path(config.model_config).stem if config.model_config else Path(config.model).name
    return f"{data}-{model}-{config.optimizer}"
