"""The configuration of a ``gnlorp-train`` run, and its command line.

:class:`RunConfig` is built from the option groups of :mod:`gnlorp_dist.options` (the model,
the projection and moments, device and precision, schedule, data, parallelism), which
``gnlorp-finetune``, ``gnlorp-bench`` and ``gnlorp-memory`` share, plus the fields only
gnlorp-train has (reduction, engines, checkpoints). Every field is one flag (``max_steps`` ->
``--max-steps``) whose help text is the docstring under the field, made by
:func:`gnlorp_dist.options.parser.build_parser`; ``--config run.yaml`` reads options from a
file. Fields left ``None`` take the model's recipe (models.py) when the run is resolved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from gnlorp_dist.device import DEVICES, check_autocast
from gnlorp_dist.models import known_model_names, llama_config, recipe_for_config
from gnlorp_dist.optim.validation import GRADIENT_REDUCTIONS
from gnlorp_dist.options.fields import (
    MUST_MATCH,
    OVERRIDABLE,
    field_docs,
    option,
    resume_rule_fields,
    shared,
)
from gnlorp_dist.options.groups import (
    DTYPES,
    DataOptions,
    LoopOptions,
    MethodOptions,
    ModelOptions,
    ParallelOptions,
    PrecisionOptions,
    RuntimeOptions,
    ScheduleOptions,
)
from gnlorp_dist.options.optimizer import (
    OPTIMIZER_PROJ_TYPES,
    MomentOptions,
    ProjectionOptions,
    projection_rank,
)
from gnlorp_dist.options.parser import build_parser as build_options_parser
from gnlorp_dist.options.parser import config_from_namespace as options_from_namespace
from gnlorp_dist.options.parser import parse_namespace
from gnlorp_dist.training.resume_settings import apply_overrides

__all__ = ["RunConfig", "build_parser", "config_from_args", "field_docs", "resolve"]

OPTIMIZERS = ("gradnormlorp", "galore", "adamw")
GRAD_REDUCTION_ALIASES = {"ddp": "none", "owners": "full", "lowrank": "low_rank"}
"""Deprecated ``--grad-reduction`` spellings and the API's names they mean."""
GRAD_REDUCTIONS = ("auto", *GRADIENT_REDUCTIONS)
CLIP_NORMS = ("auto", "full", "consumed")
OVERLAP_REDUCTIONS = ("on", "off")
NON_FINITE_POLICIES = ("skip", "raise")
# GaLore's full-rank baseline lr; the projected recipes' lr (0.01) diverges with plain AdamW.
ADAMW_DEFAULT_LR = 1e-3


def canonical_grad_reduction(name: str) -> str:
    """``name`` with a deprecated spelling (ddp, owners, lowrank) replaced by the API's."""
    return GRAD_REDUCTION_ALIASES.get(name, name)


# The bases are listed last group first: a dataclass orders inherited fields from the end of
# the MRO, so --help starts with the model.
@dataclass(frozen=True, kw_only=True)
class RunConfig(
    ParallelOptions,
    DataOptions,
    ScheduleOptions,
    PrecisionOptions,
    RuntimeOptions,
    MomentOptions,
    ProjectionOptions,
    ModelOptions,
):
    """One pre-training run. Defaults: a 1-2 minute GradNormLoRP run of llama_nano on the
    embedded Shakespeare corpus, on a CPU."""

    optimizer: Annotated[str, MUST_MATCH] = shared(MethodOptions, "optimizer", choices=OPTIMIZERS)
    lora_rank: Annotated[int | None, MUST_MATCH] = shared(MethodOptions, "lora_rank")
    detach_norm: Annotated[bool, MUST_MATCH] = shared(MethodOptions, "detach_norm")
    max_steps: int = shared(LoopOptions, "max_steps")
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    project_lm_head: Annotated[bool, MUST_MATCH] = False
    """gradnormlorp/galore: also project lm_head's gradient (GaLore-style, as the targeted
    linears of galore: no weight norm on lm_head), so its Adam moments take the low-rank shape
    instead of 2 x vocab x hidden floats; the embedding stays dense. Needs an untied lm_head.
    Off by default (the dense group holds lm_head, as in GaLore's recipes); see
    docs/training.md for its measured effect on loss."""
    clip_norm_of: str = option("auto", choices=CLIP_NORMS)
    """Which norm --grad-clip bounds: consumed (the optimizer clips what it consumes: each
    projected matrix's low-rank gradient and each dense parameter's gradient, one global norm
    over the ranks; unlike torch's clip_grad_norm_ the projected matrices count with their
    low-rank gradients, not the full ones), full (the whole averaged gradient, torch's
    clip_grad_norm_ before the step; needs a rank holding it: one process, or --grad-reduction
    none) or auto: consumed for gradnormlorp/galore at every world size, so 1 and N processes
    clip alike; full for adamw (it consumes the full gradient: the two norms are the same) and
    under DeepSpeed (its engine clips). run_config.json records the resolved rule; a resume keeps
    the checkpoint's rule (auto takes it; a different explicit rule is refused)."""
    on_nonfinite: str = option("skip", choices=NON_FINITE_POLICIES)
    """What a step with a NaN/inf gradient does: skip (weights, moments and step counters stay
    unchanged; the batch is consumed and the lr schedule and step count advance, as DeepSpeed's
    and AMP's skipped steps do; each skip is logged) or raise (stop with an error). With
    --per-layer such a step always raises (the parameters update one by one inside backward)."""
    max_consecutive_skips: int = 10
    """Stop with an error after this many skipped steps in a row (--on-nonfinite skip)."""
    deepspeed: str | None = option(None, metavar="PATH")
    """A DeepSpeed JSON (see ds_configs/): train through deepspeed.initialize with ZeRO 0-3;
    its "auto" values are filled from these flags (batch, accumulation, clip, bf16). Under
    accelerate launch --use_deepspeed, the plugin's --deepspeed_config_file."""
    fsdp: bool = False
    """Shard the model with FSDP2 (torch's fully_shard per decoder layer, then the root) instead
    of DDP: each rank keeps its rows of every weight, gradient and optimizer state, and
    checkpoints are torch.distributed.checkpoint shards that resume on any number of processes.
    Not with --deepspeed, --per-layer or --grad-reduction full."""
    grad_reduction: str = option(
        "auto",
        choices=(*GRAD_REDUCTIONS, *GRAD_REDUCTION_ALIASES),
        metavar="{" + ",".join(GRAD_REDUCTIONS) + "}",
    )
    """With several processes, GradNormLoRPAdamW's gradient_reduction: low_rank (the optimizer
    reduces only each projected matrix's low-rank gradient to its owner, which broadcasts the
    low-rank update; dense blocks are reduced to their owners and broadcast: fewer bytes than
    DDP + AdamW, the same math), full (every gradient block reduced in full to its owner: DDP +
    AdamW's traffic), none (the optimizer reduces nothing: DDP all-reduces every gradient,
    owners broadcast updated weights: 1.5x DDP + AdamW's traffic), or auto (low_rank for a
    projected optimizer without --deepspeed/--fsdp, else none). The old spellings lowrank,
    owners and ddp are deprecated aliases of low_rank, full and none."""
    overlap_reduction: str = option("on", choices=OVERLAP_REDUCTIONS)
    """With --grad-reduction low_rank: start each matrix's low-rank reduce inside the backward
    pass as soon as its gradient is final, overlapping the rest of backward (on), or in the
    optimizer step (off). The weights are bitwise the same either way (benchmarks/overlap.py
    measures the step time of both)."""
    overlap_directions: str = option("off", choices=OVERLAP_REDUCTIONS)
    """With --grad-reduction low_rank (not --per-layer): apply each projected matrix's direction
    just before its module's next forward, so the owners' broadcasts overlap the forward (on), or
    inside the optimizer step (off). The weights are bitwise the same either way; evaluation,
    checkpoints and the final model apply what is pending first."""
    data_config: Annotated[str | None, MUST_MATCH] = option(None, metavar="NAME")
    """Hub dataset configuration, e.g. en for allenai/c4."""
    text_field: Annotated[str, MUST_MATCH] = option("text", metavar="FIELD")
    """Field holding the text in .jsonl rows and hub datasets."""
    eval_fraction: Annotated[float, MUST_MATCH] = 0.05
    """Fraction of the blocks held out for evaluation (local and embedded data)."""
    eval_every: int = shared(LoopOptions, "eval_every")
    output_dir: str | None = shared(LoopOptions, "output_dir")
    save_every: int = 100
    """Checkpoint every this many steps (and always at the last step); 0: only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints; 0 keeps all."""
    resume: str = option("auto", metavar="auto|never|PATH")
    """auto (newest complete checkpoint in output_dir, if any), never, or a checkpoint folder
    (or a run's output folder: its newest checkpoint). A resume refuses settings that shape
    the optimizer state, the model or the data order when they differ from the checkpoint's,
    naming each with the checkpoint's value."""
    override: tuple[str, ...] = option((), metavar="NAME=VALUE")
    """Settings this resume changes knowingly, though they differ from the checkpoint's:
    lr=VALUE (the one such setting; it replaces --lr: the schedule continues from the
    checkpoint's step with this peak lr). Logged, and recorded in run_config.json."""
    log_every: int = shared(LoopOptions, "log_every")
    progress: bool = True
    """Show a progress bar (--no-progress hides it)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grad_reduction", canonical_grad_reduction(self.grad_reduction))


RESUME_MUST_MATCH = (*resume_rule_fields(RunConfig, MUST_MATCH), "llama_config")
"""Settings a resumed run must share with its checkpoint (annotated ``Annotated[..., MUST_MATCH]``
in the options tree), and the model's shape (``llama_config`` of the run's record)."""
RESUME_OVERRIDABLE = resume_rule_fields(RunConfig, OVERRIDABLE)
"""Settings a resume may change only through ``--override NAME=VALUE``."""


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per :class:`RunConfig` field, helped by its docstring."""
    parser = build_options_parser(
        RunConfig,
        prog="gnlorp-train",
        description="Pre-train a LLaMA model with GradNormLoRP, GaLore or AdamW. With no "
        "arguments: a short llama_nano run on the embedded Shakespeare corpus.",
    )
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def config_from_namespace(namespace: argparse.Namespace) -> RunConfig:
    return options_from_namespace(RunConfig, namespace)


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    """The :class:`RunConfig` of a command line (``--config FILE`` values under its flags)."""
    return config_from_namespace(parse_namespace(build_parser(), argv))


def _positive(config: RunConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _non_negative(config: RunConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def effective_grad_reduction(config: RunConfig, world_size: int) -> str:
    """``--grad-reduction`` with ``auto`` resolved for ``world_size`` processes: the
    optimizer's ``gradient_reduction`` (none, full or low_rank)."""
    reduction = canonical_grad_reduction(config.grad_reduction)
    if reduction != "auto":
        return reduction
    engine = config.deepspeed is not None or config.fsdp
    if world_size > 1 and config.optimizer != "adamw" and not engine:
        return "low_rank"
    return "none"


def check_fsdp_flags(config: RunConfig) -> None:
    """ValueError naming the flags that cannot go with --fsdp, and why."""
    clashes = []
    if config.deepspeed is not None:
        clashes.append(
            f"--deepspeed {config.deepspeed} (DeepSpeed's engine shards and steps the model "
            "itself; under accelerate launch --use_deepspeed it comes from the plugin)"
        )
    if config.per_layer:
        clashes.append(
            "--per-layer (FSDP2 reduce-scatters gradients after the backward of each layer, so "
            "a hook inside backward never sees a finished gradient shard)"
        )
    if config.grad_reduction not in ("auto", "none"):
        clashes.append(
            f"--grad-reduction {config.grad_reduction} (FSDP2 reduce-scatters every gradient "
            "to the rank holding its rows)"
        )
    if clashes:
        raise ValueError(
            "--fsdp cannot be combined with " + "; ".join(clashes) + ". Drop those flags, or "
            "drop --fsdp (DDP supports them)"
        )


def _check_names(config: RunConfig) -> None:
    """The optimizer, dtype, device, autocast and projection side are ones this run knows."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")
    if config.dtype == "fp16":
        raise ValueError(
            "--dtype fp16 is not supported: fp16 needs dynamic loss scaling, which neither the "
            "projected update nor its SVD refresh does, and GaLore's recipes train in bf16; use "
            "--dtype bf16, or --dtype fp32 --autocast bf16"
        )
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose one of {DTYPES}")
    if config.device not in DEVICES and not config.device.startswith("cuda:"):
        raise ValueError(f"--device {config.device!r}: use one of {', '.join(DEVICES)} or cuda:N")
    check_autocast(config.autocast, config.dtype)
    if config.proj_type not in OPTIMIZER_PROJ_TYPES:
        raise ValueError(
            f"unknown proj_type {config.proj_type!r}; choose one of {OPTIMIZER_PROJ_TYPES}"
        )


def _check_projected_only(config: RunConfig) -> None:
    """Weight-norm, 8-bit, per-layer and projection flags need the optimizer that has them."""
    if config.optimizer != "gradnormlorp" and (config.lora_rank is not None or config.detach_norm):
        raise ValueError(
            f"--lora-rank and --detach-norm need weight normalisation, i.e. --optimizer "
            f"gradnormlorp; got --optimizer {config.optimizer}"
        )
    if config.bits not in (8, 32):
        raise ValueError(f"--bits {config.bits}: use 32 or 8")
    if config.optimizer == "adamw" and (config.bits != 32 or config.per_layer):
        raise ValueError(
            "--bits 8 and --per-layer need a projected optimizer (gradnormlorp or galore); "
            f"got --optimizer adamw with --bits {config.bits}, per_layer={config.per_layer}"
        )
    projection_flags = [
        f"--{name.replace('_', '-')}"
        for name in ProjectionOptions.__dataclass_fields__
        if name not in ("rank", "update_proj_gap", "scale", "proj_type")
        and getattr(config, name) != getattr(ProjectionOptions(), name)
    ]
    if config.second_moment != "adam":
        projection_flags.append("--second-moment")
    if config.optimizer == "adamw" and projection_flags:
        raise ValueError(
            f"{', '.join(projection_flags)} set the projection of gradnormlorp/galore; "
            "--optimizer adamw projects nothing: drop them or pick a projected optimizer"
        )
    if not 0.0 <= config.lazy_refresh_threshold <= 1.0:
        raise ValueError(
            f"--lazy-refresh-threshold {config.lazy_refresh_threshold}: use a value in [0, 1] "
            "(0 keeps the fixed --update-proj-gap)"
        )


def _check_reduction(config: RunConfig) -> None:
    """Reduction, overlap and clipping rules are known and fit the optimizer."""
    if config.grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(
            f"unknown grad_reduction {config.grad_reduction!r}; choose one of {GRAD_REDUCTIONS}"
        )
    for flag, value in (
        ("--overlap-reduction", config.overlap_reduction),
        ("--overlap-directions", config.overlap_directions),
    ):
        if value not in OVERLAP_REDUCTIONS:
            raise ValueError(f"unknown {flag} {value!r}; choose one of {OVERLAP_REDUCTIONS}")
    if config.clip_norm_of not in CLIP_NORMS:
        raise ValueError(
            f"unknown --clip-norm-of {config.clip_norm_of!r}; choose one of {CLIP_NORMS}"
        )
    if config.optimizer == "adamw" and (
        config.grad_reduction in ("full", "low_rank") or config.clip_norm_of == "consumed"
    ):
        raise ValueError(
            f"--grad-reduction {config.grad_reduction} / --clip-norm-of {config.clip_norm_of} "
            "need a projected optimizer (gradnormlorp or galore): torch's AdamW neither reduces "
            "gradients nor clips; use --grad-reduction none --clip-norm-of full with adamw"
        )


def _check_engines(config: RunConfig) -> None:
    """--deepspeed and --fsdp take over the step: the flags they replace are refused."""
    if config.deepspeed is not None:
        if config.autocast != "none":
            raise ValueError(
                f"--autocast {config.autocast} with --deepspeed: DeepSpeed casts the model "
                "itself; use --dtype bf16 (DeepSpeed's bf16 mode keeps fp32 masters) and "
                "--autocast none"
            )
        if config.per_layer or config.grad_reduction not in ("auto", "none"):
            raise ValueError(
                "--deepspeed steps the optimizer through DeepSpeed's engine, which reduces "
                "gradients itself: drop --per-layer and --grad-reduction (got per_layer="
                f"{config.per_layer}, grad_reduction={config.grad_reduction!r})"
            )
        if config.clip_norm_of == "consumed":
            raise ValueError(
                "--clip-norm-of consumed with --deepspeed: DeepSpeed clips the gradient itself "
                '("gradient_clipping"); use --clip-norm-of auto'
            )
        if not Path(config.deepspeed).is_file():
            raise ValueError(
                f"--deepspeed {config.deepspeed!r} does not exist; see ds_configs/ for configs"
            )
    if config.fsdp:
        check_fsdp_flags(config)


def _check_numbers(config: RunConfig) -> Any:
    """Numbers in range, the model known; returns its ``LlamaConfig``."""
    if config.model_config is None and config.model not in known_model_names():
        raise ValueError(
            f"unknown model {config.model!r}; known models: {', '.join(known_model_names())} "
            "(or pass a config JSON with --model-config)"
        )
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    if config.on_nonfinite not in NON_FINITE_POLICIES:
        raise ValueError(
            f"--on-nonfinite {config.on_nonfinite!r}: choose one of {NON_FINITE_POLICIES}"
        )
    _positive(config, "max_consecutive_skips")
    llama = llama_config(config.model_config or config.model)
    positive = ("rank", "update_proj_gap", "scale", "lr", "max_steps", "batch_size", "grad_accum")
    _positive(config, "world_size")
    _positive(config, *positive, "seq_len", "lora_rank", "log_every")
    non_negative = ("weight_decay", "warmup_steps", "grad_clip", "eval_every", "eval_batches")
    _non_negative(config, *non_negative, "save_every", "keep_checkpoints")
    if not 0.0 < config.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {config.eval_fraction}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {config.min_lr_ratio}")
    if config.seq_len > llama.max_position_embeddings:
        raise ValueError(
            f"--seq-len {config.seq_len} exceeds the model's max_position_embeddings "
            f"{llama.max_position_embeddings}"
        )
    if config.resume not in ("auto", "never") and not Path(config.resume).is_dir():
        raise ValueError(f"--resume {config.resume!r}: not auto, never, or a checkpoint folder")
    return llama


def _with_recipe(config: RunConfig, llama: Any) -> RunConfig:
    """``config`` with the fields left None filled from the model's recipe."""
    recipe = recipe_for_config(llama)
    model_label = Path(config.model_config).stem if config.model_config else config.model
    default_lr = ADAMW_DEFAULT_LR if config.optimizer == "adamw" else recipe.lr
    rank = projection_rank(config.rank, config.lora_rank, recipe.rank)
    return dataclasses.replace(
        config,
        rank=rank,
        update_proj_gap=config.update_proj_gap or recipe.update_proj_gap,
        scale=config.scale if config.scale is not None else recipe.scale,
        lr=config.lr if config.lr is not None else default_lr,
        warmup_steps=(
            config.warmup_steps if config.warmup_steps is not None else config.max_steps // 10
        ),
        output_dir=config.output_dir or str(Path("runs") / f"{model_label}-{config.optimizer}"),
    )


def resolve(config: RunConfig) -> tuple[RunConfig, Any]:
    """Validate ``config`` and fill its recipe defaults; returns it with its ``LlamaConfig``.

    Every user mistake raises ValueError naming the value. ``--override NAME=VALUE`` items
    become the settings' values first.
    """
    config = apply_overrides(config)
    _check_names(config)
    _check_projected_only(config)
    _check_reduction(config)
    _check_engines(config)
    llama = _check_numbers(config)
    check_project_lm_head(config, tied=bool(getattr(llama, "tie_word_embeddings", False)))
    return _with_recipe(config, llama), llama


def check_project_lm_head(config: RunConfig, *, tied: bool) -> None:
    """ValueError for --project-lm-head where it cannot work: with --optimizer adamw (nothing
    is projected) or a model whose lm_head is its embedding (``tied``)."""
    if not config.project_lm_head:
        return
    if config.optimizer == "adamw":
        raise ValueError(
            "--project-lm-head projects lm_head's gradient, but --optimizer adamw projects "
            "nothing: drop --project-lm-head or pick --optimizer gradnormlorp or galore"
        )
    if tied:
        # One matrix would need both the embedding's sparse-row gradient and a projected
        # update; the dense group's AdamW is the one that serves both.
        raise ValueError(
            "--project-lm-head with tied word embeddings: lm_head.weight is the embedding's "
            'weight, which stays dense. Use a model config with "tie_word_embeddings": false '
            "(--model-config), or drop --project-lm-head"
        )


# LlamaConfig.to_dict() keys that say nothing about the model's shape or function.
_CONFIG_NOISE = (
    "_name_or_path", "transformers_version", "id2label", "label2id", "output_attentions",
    "output_hidden_states", "return_dict", "dtype", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "use_cache", "architectures",
)  # fmt: skip


def config_record(config: RunConfig, llama: Any) -> dict[str, Any]:
    """The resolved config as JSON data (what a checkpoint stores and compares), with the
    model's shape in ``llama_config``."""
    shape = {k: v for k, v in llama.to_dict().items() if k not in _CONFIG_NOISE}
    record = {**dataclasses.asdict(config), "llama_config": shape}
    if not config.project_lm_head:
        # Recorded only when on, as before the other options' keys were compared with their
        # defaults when missing (resume_settings): records stay as older runs wrote them.
        del record["project_lm_head"]
    return json.loads(json.dumps(record))  # exactly what reading the JSON file back gives
