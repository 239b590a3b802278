"""The configuration of a ``gnlorp-finetune`` run, and the command line generated from it.

Every field of :class:`FinetuneConfig` is one flag (``max_seq_len`` -> ``--max-seq-len``)
whose help text is the docstring under the field. Fields left ``None`` are filled by
:func:`resolve` from one of two recipes:

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

from gnlorp_dist.device import DEVICES, resolve_device
from gnlorp_dist.finetune.data import GLUE_TASKS
from gnlorp_dist.finetune.metrics import METRIC_NAMES
from gnlorp_dist.finetune.models import TINY_MODELS
from gnlorp_dist.optim.projection import PROJ_TYPES
from gnlorp_dist.training.config import field_docs

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


@dataclass(kw_only=True)
class FinetuneConfig:
    """One fine-tuning run. Defaults: GradNormLoRP (full mode) on tiny-roberta, from scratch."""

    model: str = "tiny-roberta"
    """tiny-roberta, tiny-bert, tiny-bart (built in, random init, offline), a local model folder
    (config + weights), or a hub name such as roberta-base (downloaded)."""
    model_config: str | None = None
    """A config.json (e.g. {"model_type": "roberta", ...}): that architecture, random init;
    replaces --model."""
    tokenizer: str | None = None
    """Tokenizer folder or hub name (default: the model's own; for random-init models a
    word-level tokenizer learnt from the training split)."""
    target_modules: str | None = None
    """Comma-separated names of the body's linear layers to normalise and project (default
    per architecture: query,key,value,dense for BERT/RoBERTa;
    q_proj,k_proj,v_proj,out_proj,fc1,fc2 for BART)."""
    task: str | None = None
    """A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): its columns and
    metrics; without --train-file its data is downloaded from the hub (nyu-mll/glue)."""
    train_file: str | None = None
    """Local training data: .csv, .tsv, .json or .jsonl with a header / keys."""
    validation_file: str | None = None
    """Local validation data (default: --validation-fraction of the training file)."""
    validation_fraction: float = 0.1
    """Share of the training file held out for validation when there is no validation file."""
    text_columns: str | None = None
    """Text column, or two comma-separated columns for sentence pairs (default: the task's, or
    the first of sentence1,sentence2 / sentence / text found)."""
    label_column: str = "label"
    """Column holding the label (a class id, a class name, or a float score)."""
    problem_type: str = "auto"
    """auto (float labels: regression, else classification), classification or regression."""
    metric: str | None = None
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
    optimizer: str = "gradnormlorp"
    """The method (alias --method): gradnormlorp (weight norm + projected AdamW), galore
    (projection, no weight norm), adamw, or wegeft (weight-generative fine-tuning: frozen body,
    AdamW on the generated updates dW = s (W0 phi^T) psi and the head; see docs/finetune.md)."""
    rank: int | None = None
    """Projection rank r (default 8, GaLore's GLUE rank; in LoRA mode at most --lora-rank)."""
    update_proj_gap: int | None = None
    """Subspace refresh gap T in steps (default: 500 pre-trained, 50 random init)."""
    scale: float | None = None
    """Scale alpha of the projected update (default: 4 pre-trained, 1 random init)."""
    proj_type: str = "std"
    """Which side to project: std (GaLore's rule), reverse_std, left, right."""
    lora_rank: int | None = None
    """gradnormlorp only: LoRA mode (V = W0 + sBA, W0 frozen, adapters projected) with this
    adapter rank; embeddings and body frozen, head trained."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (s = alpha / lora_rank; default alpha = lora_rank)."""
    detach_norm: bool = False
    """gradnormlorp only: treat ||V|| as a constant in backward, as DoRA does."""
    wegeft_rank: int | None = None
    """wegeft only: rank r of the generator (phi, psi of shape r x in; default 8)."""
    wegeft_alpha: float | None = None
    """wegeft only: scaling numerator (s = alpha / r; default alpha = r)."""
    wegeft_shared: bool = False
    """wegeft only: one generator per projection type shared by all blocks (the authors'
    tied modules) instead of one per layer."""
    wegeft_dropout: float = 0.0
    """wegeft only: dropout on W0 inside the generator while training."""
    bits: int = 32
    """Optimizer-state bits for gradnormlorp/galore: 32, or 8 (block-wise 8-bit moments)."""
    lr: float | None = None
    """Peak learning rate (default: 3e-5 pre-trained, 2e-3 random init; AdamW 2e-5 / 1e-3)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_ratio: float = 0.06
    """Share of the steps with linear warmup (RoBERTa's GLUE recipe); then linear decay to 0."""
    epochs: int | None = None
    """Passes over the training data (default: 3 pre-trained, 10 random init)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: --epochs decides)."""
    batch_size: int = 16
    """Examples per optimizer step (GaLore's GLUE batch)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this before the step; 0 disables."""
    eval_every: int = 0
    """Evaluate every this many steps (0: at the end of every epoch); always at the end."""
    log_every: int = 10
    """Print a log line every this many steps."""
    output_dir: str | None = None
    """Where the merged model, metrics.json and TensorBoard logs go (default:
    runs/finetune-<data>-<model>-<optimizer>)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <output-dir>/tensorboard (needs the tensorboard
    package)."""
    device: str = "auto"
    """auto (the GPU when torch sees one, else the CPU), cpu, or cuda (an error when torch
    sees no GPU)."""
    tf32: bool = True
    """TF32 matmuls on Ampere and newer GPUs (--no-tf32 keeps full fp32 matmuls); no effect on
    the CPU."""
    threads: int | None = None
    """CPU threads torch uses during the run (default: 1 for models of hidden size < 256, whose
    matrices are too small to split and which slow down badly on a busy machine with more;
    torch's default otherwise)."""
    seed: int = 0
    """Seeds model init, the validation hold-out, data order and dropout."""


_CHOICES = {
    "optimizer": OPTIMIZERS,
    "proj_type": PROJ_TYPES,
    "bits": (32, 8),
    "problem_type": PROBLEM_TYPES,
    "task": tuple(GLUE_TASKS),
    "device": DEVICES,
}
_TYPES = {"int": int, "float": float, "str": str}
_METAVARS = {"int": "N", "float": "X", "str": "STR"}
_NAMED_METAVARS = {
    "model": "NAME|PATH", "model_config": "PATH", "tokenizer": "PATH", "train_file": "PATH",
    "validation_file": "PATH", "output_dir": "PATH", "text_columns": "COL[,COL2]",
    "label_column": "COL", "metric": "NAMES", "target_modules": "NAMES",
}  # fmt: skip
_ALIASES = {"text_columns": ["--text-column"], "optimizer": ["--method"]}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`FinetuneConfig` field, helped by its docstring."""
    parser = argparse.ArgumentParser(
        prog="gnlorp-finetune",
        description="Fine-tune a sequence classifier (RoBERTa, BERT, BART) with GradNormLoRP, "
        "GaLore, AdamW or WeGeFT on a GLUE task or local CSV/JSON files, then save the merged "
        "model.",
    )
    docs = field_docs(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        help_text = docs.get(f.name, "")
        if not any(f.default is v for v in (None, False, True)) and "default" not in help_text:
            help_text += f" (default: {f.default})"
        help_text = help_text.replace("%", "%%")
        flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
        if f.type == "bool" and f.default is True:
            # A flag that could only set True again would be useless: offer the way out.
            flag = f"--no-{f.name.replace('_', '-')}"
            parser.add_argument(flag, dest=f.name, action="store_false", help=help_text)
            continue
        if f.type == "bool":
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
            continue
        base = str(f.type).split("|")[0].strip()
        parser.add_argument(
            *flags,
            dest=f.name,
            type=_TYPES[base],
            default=f.default,
            choices=_CHOICES.get(f.name),
            help=help_text,
            metavar=None if f.name in _CHOICES else _NAMED_METAVARS.get(f.name, _METAVARS[base]),
        )
    return parser


def config_from_args(argv: list[str] | None = None) -> FinetuneConfig:
    return FinetuneConfig(**vars(build_parser().parse_args(argv)))


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


def resolve(config: FinetuneConfig) -> FinetuneConfig:
    """Check ``config`` and fill its recipe defaults. User mistakes raise ValueError."""
    _check_choice(config.optimizer, OPTIMIZERS, "--optimizer")
    _check_choice(config.proj_type, PROJ_TYPES, "--proj-type")
    _check_choice(config.bits, (32, 8), "--bits")
    _check_choice(config.problem_type, PROBLEM_TYPES, "--problem-type")
    _check_choice(config.device, DEVICES, "--device")
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
    names = (
        "rank",
        "update_proj_gap",
        "scale",
        "lr",
        "epochs",
        "lora_rank",
        "lora_alpha",
        "wegeft_rank",
        "wegeft_alpha",
        "threads",
    )
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("batch_size", "max_seq_len", "log_every", "vocab_size"):
        if getattr(config, name) <= 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}"
            )
    for name in ("max_steps", "eval_every", "weight_decay", "grad_clip"):
        if getattr(config, name) < 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}"
            )
    for name in ("max_train_samples", "max_eval_samples"):
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
    recipe = FROM_SCRATCH_RECIPE if is_from_scratch(config) else PRETRAINED_RECIPE
    rank = config.rank if config.rank is not None else recipe.rank
    if config.lora_rank is not None:
        # The projected matrices are the LoRA factors, of rank lora_rank at most.
        if config.rank is not None and config.rank > config.lora_rank:
            raise ValueError(
                f"--rank {config.rank} exceeds --lora-rank {config.lora_rank}: the projected "
                "matrices are the LoRA factors; use --rank <= --lora-rank"
            )
        rank = min(rank, config.lora_rank)
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


def _run_label(config: FinetuneConfig) -> str:
    if config.train_file is not None:
        data = Path(config.train_file).stem
    else:
        data = config.task or "data"
    model = Path(config.model_config).stem if config.model_config else Path(config.model).name
    return f"{data}-{model}-{config.optimizer}"
