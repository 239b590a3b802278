"""The configuration of a ``gnlorp-bench`` run and its validation.

:class:`BenchConfig` takes the model, schedule and data groups of :mod:`gnlorp_dist.options` and
the fields it shares with the other CLIs (rank, device, threads, ...: same flag, same help),
plus its own (methods, sweeps). Every field is one flag (``loss_window`` -> ``--loss-window``)
whose help text is the docstring under the field (:mod:`gnlorp_dist.options.parser`). Fields
left ``None`` take the model's recipe (:mod:`gnlorp_dist.models`) when resolved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig

from gnlorp_dist.device import resolve_device
from gnlorp_dist.models import ModelSpec, known_model_names, llama_config, recipe_for_config
from gnlorp_dist.options.fields import option, shared
from gnlorp_dist.options.groups import (
    DataOptions,
    LoopOptions,
    MethodOptions,
    ModelOptions,
    RuntimeOptions,
    ScheduleOptions,
)
from gnlorp_dist.options.optimizer import PROJ_TYPES, ProjectionOptions

METHODS: tuple[str, ...] = (
    "adamw",
    "adamw8bit",
    "galore",
    "galore-torch",
    "lora",
    "dora",
    "wegeft",
    "gradnormlorp",
    "gradnormlorp8bit",
    "vlorp",
    "vlorp-projfactor",
    "gradnormlorp-granular",
)
"""Every method the comparison knows, in table order."""

GRANULAR_METHODS = ("vlorp", "vlorp-projfactor", "gradnormlorp-granular")
"""Methods projecting at granularity c = --granularity with rank --vlorp-rank (VLoRP, 2505.01744):
each M x N gradient reshaped to (M c, N / c) and projected on the right."""

DEFAULT_METHODS: tuple[str, ...] = tuple(
    m for m in METHODS if m != "wegeft" and m not in GRANULAR_METHODS
)
"""What a plain ``gnlorp-bench`` compares: the eight methods of the published tables (wegeft
and the granular methods run when named in --methods)."""

PROJECTED_METHODS = ("galore", "galore-torch", "gradnormlorp", "gradnormlorp8bit")
PROJECTED_METHODS += GRANULAR_METHODS
"""Methods that train with the model recipe's lr, rank, refresh gap and scale."""

SWEEPS: tuple[str, ...] = ("rank", "gap", "granularity")
"""What ``--sweep`` varies: the projection rank r, the subspace refresh gap T, or the
granularity c of the granular methods at a fixed memory budget c * r = --rank."""

GALORE_TORCH_DENSE = ("adamw", "galore")
DEFAULT_SWEEP_METHODS = ("gradnormlorp", "galore")
DEFAULT_GRANULARITY_SWEEP_METHODS = ("vlorp", "vlorp-projfactor", "gradnormlorp-granular")
DEFAULT_GRANULARITY = 4
DEFAULT_OUTPUT_DIR = "benchmarks/results/compare"
# GaLore's full-rank baseline lr (run_config.ADAMW_DEFAULT_LR); the projected recipes' 0.01
# diverges with plain AdamW. LoRA/DoRA adapters are trained with the same AdamW lr.
DEFAULT_ADAMW_LR = 1e-3


# The bases are listed last group first: a dataclass orders inherited fields from the end of
# the MRO, so --help starts with the model.
@dataclass(frozen=True, kw_only=True)
class BenchConfig(DataOptions, ScheduleOptions, ModelOptions):
    """One comparison (or sweep): the same model, data, seed, schedule, batch and steps for every
    method. Defaults: all eight methods on llama_nano, 80 steps of 4 x 128 tokens, one CPU
    thread: about 6-8 minutes on a 2-core CPU."""

    methods: tuple[str, ...] = option(DEFAULT_METHODS, metavar="METHOD")
    """Methods to compare (adamw is the baseline of the time ratio): adamw, adamw8bit, galore,
    galore-torch, lora, dora, gradnormlorp, gradnormlorp8bit (the default eight); wegeft
    (weight-generative fine-tuning, rank --lora-rank, AdamW at --adamw-lr); and the granular
    methods at granularity --granularity and rank --vlorp-rank: vlorp (plain model, random
    bases), vlorp-projfactor (the same with ProjFactor's factored second moment) and
    gradnormlorp-granular (weight-normed model, SVD bases on the right)."""
    steps: int = 80
    """Optimizer steps per method."""
    seq_len: int = 128
    eval_batches: int = 8
    adamw_lr: float = DEFAULT_ADAMW_LR
    """Peak lr of adamw, adamw8bit and of the LoRA/DoRA adapters (GaLore's full-rank lr)."""
    rank: int | None = shared(ProjectionOptions, "rank")
    update_proj_gap: int | None = shared(ProjectionOptions, "update_proj_gap")
    scale: float | None = shared(ProjectionOptions, "scale")
    proj_type: str = shared(ProjectionOptions, "proj_type", choices=PROJ_TYPES)
    granularity: int = shared(ProjectionOptions, "granularity", default=DEFAULT_GRANULARITY)
    vlorp_rank: int | None = None
    """Projection rank r of the granular methods (default: --rank / --granularity, so that their
    state c * r per matrix row equals the other projected methods' rank: an equal budget)."""
    galore_torch_dense: str = option("adamw", choices=GALORE_TORCH_DENSE)
    """Dense groups of galore-torch: adamw (torch.optim.AdamW, the convention of our dense
    groups, so galore vs galore-torch checks the projected update alone) or galore
    (GaLoreAdamW for every group, as GaLore's own script; its eps placement differs)."""
    lora_rank: int | None = shared(MethodOptions, "lora_rank")
    lora_alpha: float | None = shared(MethodOptions, "lora_alpha")
    loss_window: int = 10
    """The final train loss is the mean over this many last steps."""
    measure_memory: bool = True
    """Measure each method's peak live-tensor bytes on one extra step of a fresh copy
    (--no-measure-memory skips it)."""
    sweep: str | None = option(None, choices=SWEEPS)
    """rank, gap or granularity: instead of the comparison, final loss of --sweep-methods over
    --sweep-values of the projection rank, of the refresh gap T, or of the granularity c of the
    granular methods with rank --rank / c (c * r fixed at --rank)."""
    sweep_values: tuple[int, ...] | None = option(None, metavar="N")
    """Values of the swept setting (default: rank 8,16,32,64; gap 10,25,50,100; granularity
    1,2,4,8)."""
    sweep_methods: tuple[str, ...] = option(DEFAULT_SWEEP_METHODS, metavar="METHOD")
    """Methods of a sweep (projected ones: they are the ones with a rank and a gap; a
    granularity sweep takes granular ones, and the default pair becomes vlorp,
    vlorp-projfactor, gradnormlorp-granular)."""
    output_dir: str = shared(LoopOptions, "output_dir", default=DEFAULT_OUTPUT_DIR)
    tensorboard: bool = shared(LoopOptions, "tensorboard")
    log_every: int = shared(LoopOptions, "log_every")
    device: str = shared(RuntimeOptions, "device")
    threads: int = shared(LoopOptions, "threads", default=1)


DEFAULT_SWEEP_VALUES = {
    "rank": (8, 16, 32, 64),
    "gap": (10, 25, 50, 100),
    "granularity": (1, 2, 4, 8),
}


@dataclass(frozen=True, kw_only=True)
class Hyper:
    """The resolved hyper-parameters one run trains with."""

    lr: float
    adamw_lr: float
    rank: int
    update_proj_gap: int
    scale: float
    proj_type: str
    galore_torch_dense: str
    lora_rank: int
    lora_alpha: float
    weight_decay: float
    granularity: int = 1
    """Granularity c of the granular methods."""
    vlorp_rank: int = 0
    """Rank r of the granular methods (their state is c * r per matrix row)."""


def _check_methods(names: tuple[str, ...], flag: str, allowed: tuple[str, ...]) -> None:
    if not names:
        raise ValueError(f"{flag} is empty; choose from {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise ValueError(f"{flag}: unknown method {name!r}; choose from {', '.join(allowed)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{flag}: method {duplicates[0]!r} is listed twice")


def _positive(config: BenchConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def max_rank(llama: LlamaConfig) -> int:
    """The largest projection rank every targeted matrix of the model allows (its smaller side)."""
    head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
    kv_heads = llama.num_key_value_heads or llama.num_attention_heads
    return min(llama.hidden_size, llama.intermediate_size, kv_heads * head_dim)


def _check_ranks(config: BenchConfig, llama: LlamaConfig) -> None:
    limit = max_rank(llama)
    if config.rank is not None and config.rank > limit:
        raise ValueError(
            f"--rank {config.rank} exceeds {limit}, the smaller side of the model's smallest "
            "targeted matrix"
        )
    if config.sweep == "rank":
        for value in config.sweep_values or DEFAULT_SWEEP_VALUES["rank"]:
            if value > limit:
                raise ValueError(
                    f"--sweep-values: rank {value} exceeds {limit}, the smaller side of the "
                    "model's smallest targeted matrix"
                )


def _granular_in_use(config: BenchConfig) -> bool:
    names = config.sweep_methods if config.sweep else config.methods
    return any(m in GRANULAR_METHODS for m in names)


def _check_granular(config: BenchConfig, llama: LlamaConfig, rank: int) -> None:
    """Every (c, r) a granular method will train with: c divides every targeted matrix's input
    size, r = rank / c is a whole number (unless --vlorp-rank), r <= the reshaped width N / c."""
    if not _granular_in_use(config):
        return
    inputs = {llama.hidden_size, llama.intermediate_size}
    # (granularity c, the budget c * r it must divide or None, the rank r when given)
    pairs: list[tuple[int, int | None, int | None]]
    if config.sweep == "granularity":
        values = config.sweep_values or DEFAULT_SWEEP_VALUES["granularity"]
        pairs = [(c, rank, None) for c in values]
        flag = "--sweep-values: granularity"
    elif config.sweep == "rank":
        values = config.sweep_values or DEFAULT_SWEEP_VALUES["rank"]
        pairs = [(config.granularity, total, None) for total in values]
        flag = "--granularity"
    else:
        budget = rank if config.vlorp_rank is None else None
        pairs = [(config.granularity, budget, config.vlorp_rank)]
        flag = "--granularity"
    for c, total, r in pairs:
        bad = sorted(n for n in inputs if n % c)
        if bad:
            raise ValueError(
                f"{flag} {c} does not divide the input size {bad[0]} of a targeted matrix; "
                f"choose a divisor of {', '.join(map(str, sorted(inputs)))}"
            )
        if total is not None:
            if total % c:
                raise ValueError(
                    f"{flag} {c} does not divide the rank {total} (the granular methods train "
                    f"with rank {total} / c, keeping c * r = {total}); choose a divisor of "
                    f"{total}, or pass --vlorp-rank"
                )
            r = total // c
        assert r is not None
        if r > min(inputs) // c:
            raise ValueError(
                f"granular rank {r} exceeds {min(inputs) // c}, the reshaped width N / c of the "
                f"smallest targeted matrix at granularity {c}"
            )


def _check_sweep(config: BenchConfig) -> BenchConfig:
    """The methods and the sweep are known; a granularity sweep's default methods are the
    granular ones (returned in ``config``)."""
    _check_methods(tuple(config.methods), "--methods", METHODS)
    if config.sweep is None:
        if config.sweep_values is not None:
            raise ValueError(f"--sweep-values {config.sweep_values!r} needs --sweep rank or gap")
        return config
    if config.sweep not in SWEEPS:
        raise ValueError(f"unknown --sweep {config.sweep!r}; choose one of {', '.join(SWEEPS)}")
    if config.sweep == "granularity":
        if tuple(config.sweep_methods) == DEFAULT_SWEEP_METHODS:
            config = dataclasses.replace(config, sweep_methods=DEFAULT_GRANULARITY_SWEEP_METHODS)
        _check_methods(tuple(config.sweep_methods), "--sweep-methods", GRANULAR_METHODS)
    _check_methods(tuple(config.sweep_methods), "--sweep-methods", PROJECTED_METHODS)
    values = config.sweep_values or DEFAULT_SWEEP_VALUES[config.sweep]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"--sweep-values: {value!r} is not a positive integer")
    if len(set(values)) != len(values):
        raise ValueError(f"--sweep-values {values!r} lists a value twice")
    return config


def _check_settings(config: BenchConfig) -> LlamaConfig:
    """Choices known and numbers in range; returns the model's ``LlamaConfig``."""
    if config.proj_type not in PROJ_TYPES:
        raise ValueError(f"unknown --proj-type {config.proj_type!r}; choose one of {PROJ_TYPES}")
    if config.galore_torch_dense not in GALORE_TORCH_DENSE:
        raise ValueError(
            f"unknown --galore-torch-dense {config.galore_torch_dense!r}; choose one of "
            f"{', '.join(GALORE_TORCH_DENSE)}"
        )
    if config.model_config is None and config.model not in known_model_names():
        raise ValueError(
            f"unknown --model {config.model!r}; known models: {', '.join(known_model_names())} "
            "(or pass a config JSON with --model-config)"
        )
    _positive(config, "steps", "batch_size", "seq_len", "lr", "adamw_lr", "rank")
    _positive(config, "update_proj_gap", "scale", "lora_rank", "lora_alpha", "eval_batches")
    _positive(config, "loss_window", "log_every", "threads", "granularity", "vlorp_rank")
    for name in ("weight_decay", "warmup_steps", "grad_clip"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {config.min_lr_ratio}")
    if config.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {config.seq_len}")
    llama = llama_config(config.model_config or config.model)
    if config.seq_len > llama.max_position_embeddings:
        raise ValueError(
            f"--seq-len {config.seq_len} exceeds the model's max_position_embeddings "
            f"{llama.max_position_embeddings}"
        )
    return llama


def resolve(config: BenchConfig) -> tuple[BenchConfig, LlamaConfig, ModelSpec]:
    """Validate ``config`` and fill its defaults; every user mistake raises ValueError naming
    the offending value. Returns the config, the model's ``LlamaConfig`` and its recipe."""
    config = _check_sweep(config)
    llama = _check_settings(config)
    recipe = recipe_for_config(llama)
    _check_ranks(config, llama)
    _check_granular(config, llama, config.rank if config.rank is not None else recipe.rank)
    # Last, so that a bad --device is reported after the other mistakes, and resolved once: the
    # run then holds a concrete device ("cpu", "cuda:0"), recorded as such in the JSON.
    device = resolve_device(config.device)
    resolved = dataclasses.replace(
        config,
        methods=tuple(config.methods),
        sweep_methods=tuple(config.sweep_methods),
        sweep_values=(
            tuple(config.sweep_values or DEFAULT_SWEEP_VALUES[config.sweep])
            if config.sweep
            else None
        ),
        lr=config.lr if config.lr is not None else recipe.lr,
        rank=config.rank if config.rank is not None else recipe.rank,
        update_proj_gap=config.update_proj_gap or recipe.update_proj_gap,
        scale=config.scale if config.scale is not None else recipe.scale,
        warmup_steps=(
            config.warmup_steps if config.warmup_steps is not None else config.steps // 10
        ),
        output_dir=str(Path(config.output_dir)),
        device=str(device),
    )
    return resolved, llama, recipe


def hyper(config: BenchConfig, **overrides: int) -> Hyper:
    """The hyper-parameters of one run of a resolved ``config`` (a sweep overrides rank/gap)."""
    rank = int(overrides.get("rank", config.rank))  # type: ignore[arg-type]
    gap = int(overrides.get("update_proj_gap", config.update_proj_gap))  # type: ignore[arg-type]
    lora_rank = config.lora_rank or rank
    granularity = int(overrides.get("granularity", config.granularity))
    # A rank or granularity sweep keeps c * r at the swept/configured rank.
    fixed = config.vlorp_rank if not ({"rank", "granularity"} & set(overrides)) else None
    vlorp_rank = fixed or max(1, rank // granularity)
    return Hyper(
        lr=float(config.lr),  # type: ignore[arg-type]
        adamw_lr=config.adamw_lr,
        rank=rank,
        update_proj_gap=gap,
        scale=float(config.scale),  # type: ignore[arg-type]
        proj_type=config.proj_type,
        galore_torch_dense=config.galore_torch_dense,
        lora_rank=lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else float(lora_rank),
        weight_decay=config.weight_decay,
        granularity=granularity,
        vlorp_rank=vlorp_rank,
    )
