"""The configuration of a ``gnlorp-train`` run, and the command line generated from it.

Every field of :class:`RunConfig` is one flag (``max_steps`` -> ``--max-steps``) whose help
text is the docstring under the field, so the two never drift apart. Fields left ``None`` take
the model's recipe (models.py) when the run is resolved.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gnlorp_dist.device import AUTOCAST_DTYPES, DEVICES, check_autocast
from gnlorp_dist.models import known_model_names, llama_config, recipe_for_config
from gnlorp_dist.optim.projection import SVD_METHODS
from gnlorp_dist.optim.projector import OPTIMIZER_PROJ_TYPES, SECOND_MOMENTS
from gnlorp_dist.optim.vlorp import BASIS_KINDS

OPTIMIZERS = ("gradnormlorp", "galore", "adamw")
GRAD_REDUCTIONS = ("auto", "ddp", "owners", "lowrank")
CLIP_NORMS = ("auto", "full", "consumed")
OVERLAP_REDUCTIONS = ("on", "off")
NON_FINITE_POLICIES = ("skip", "raise")
DTYPES = ("fp32", "bf16")
# GaLore's full-rank baseline lr; the projected recipes' lr (0.01) diverges with plain AdamW.
ADAMW_DEFAULT_LR = 1e-3
# Settings a resumed run must share with its checkpoint: the model and optimizer structure,
# hyper-parameters the optimizer's saved state would silently override, and the data order.
RESUME_MUST_MATCH = (
    "model", "llama_config", "optimizer", "rank", "update_proj_gap", "scale", "proj_type",
    "lora_rank", "detach_norm", "lr", "weight_decay", "dtype", "bits", "seq_len", "data",
    "data_config", "text_field", "tokenizer", "eval_fraction", "seed",
)  # fmt: skip


@dataclass(kw_only=True)
class RunConfig:
    """One pre-training run. Defaults: a 1-2 minute GradNormLoRP run of llama_nano on the
    embedded Shakespeare corpus, on a CPU."""

    model: str = "llama_nano"
    """Named LLaMA shape and recipe: llama_nano, llama_micro, llama_60m ... llama_7b."""
    model_config: str | None = None
    """Path to a GaLore-style JSON or a Hugging Face config.json; replaces --model's shape."""
    optimizer: str = "gradnormlorp"
    """gradnormlorp (weight norm + projected AdamW), galore (projection, no weight norm), adamw."""
    rank: int | None = None
    """Projection rank r (default: the model's recipe; in LoRA mode at most --lora-rank)."""
    update_proj_gap: int | None = None
    """Subspace refresh gap T in steps (default: the model's recipe)."""
    scale: float | None = None
    """Scale alpha of the projected update (default: the model's recipe)."""
    proj_type: str = "std"
    """Which side to project: std (GaLore's rule), reverse_std, left, right (SVD bases), or
    random (VLoRP: a seeded Gaussian/Rademacher basis on the right, regenerated per refresh
    window, never stored; see --random-basis, --projection-seed)."""
    lora_rank: int | None = None
    """gradnormlorp only: LoRA mode (V = W0 + BA, W0 frozen) with this adapter rank."""
    detach_norm: bool = False
    """gradnormlorp only: treat ||V|| as a constant in backward, as DoRA does."""
    lr: float | None = None
    """Peak learning rate (default: the recipe's for gradnormlorp/galore, 1e-3 for adamw)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_steps: int | None = None
    """Linear warmup steps (default: 10% of --max-steps)."""
    max_steps: int = 120
    """Optimizer steps to train for (a resumed run continues up to this)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to min_lr_ratio * lr."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this before the step; 0 disables."""
    clip_norm_of: str = "auto"
    """Which norm --grad-clip bounds: consumed (the optimizer clips what it consumes: each
    projected matrix's low-rank gradient and each dense parameter's gradient, one global norm
    over the ranks; unlike torch's clip_grad_norm_ the projected matrices count with their
    low-rank gradients, not the full ones), full (the whole averaged gradient, torch's
    clip_grad_norm_ before the step; needs a rank holding it: one process, or --grad-reduction
    ddp) or auto: consumed for gradnormlorp/galore at every world size, so 1 and N processes
    clip alike; full for adamw (it consumes the full gradient: the two norms are the same) and
    under DeepSpeed (its engine clips). run_config.json records the resolved rule; a resume keeps
    the checkpoint's rule (auto takes it; a different explicit rule is refused)."""
    on_nonfinite: str = "skip"
    """What a step with a NaN/inf gradient does: skip (weights, moments and step counters stay
    unchanged; the batch is consumed and the lr schedule and step count advance, as DeepSpeed's
    and AMP's skipped steps do; each skip is logged) or raise (stop with an error). With
    --per-layer such a step always raises (the parameters update one by one inside backward)."""
    max_consecutive_skips: int = 10
    """Stop with an error after this many skipped steps in a row (--on-nonfinite skip)."""
    batch_size: int = 4
    """Micro-batch size in sequences (per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 256
    """Tokens per sequence."""
    dtype: str = "fp32"
    """fp32, or bf16 (pure bf16 weights and states, GaLore's single-GPU recipe). fp16 is
    refused: it needs loss scaling, which the projected update does not do."""
    autocast: str = "none"
    """none, or bf16: fp32 master weights and optimizer states, matmuls in bf16 under
    torch.autocast (needs --dtype fp32)."""
    device: str = "auto"
    """auto (cuda:<LOCAL_RANK> when torch sees a GPU, else the CPU), cpu, or cuda (this
    process's GPU). Several processes on GPUs talk over NCCL, on CPUs over gloo."""
    tf32: bool = True
    """TF32 matmuls on Ampere and newer GPUs (--no-tf32 keeps full fp32 matmuls)."""
    bits: int = 32
    """Optimizer-state bits for gradnormlorp/galore: 32, or 8 (block-wise 8-bit moments, on
    each tensor's block grid under every engine, updated chunk by chunk)."""
    proj_bits: int = 16
    """Bits of the projection bases (gradnormlorp/galore): 16 (not quantised: the gradient's
    dtype), 8 (INT8) or 4 (INT4, two per byte), with one float32 scale per 128 values, restored
    on use (Q-GaLore's INT4 projections)."""
    svd_method: str = "auto"
    """How a subspace refresh decomposes the gradient: auto (randomized for matrices whose
    smaller side is >= 2048, else the exact SVD), svd, or randomized."""
    lazy_refresh_threshold: float = 0.0
    """Lazy refresh: at each refresh, a subspace whose new basis overlaps the old one by at least
    this (mean squared cosine of all principal angles, in [0, 1]) doubles its gap to the next
    refresh (up to 8x --update-proj-gap); one that moved goes back to the gap. 0: the fixed gap."""
    granularity: int = 1
    """VLoRP's projection granularity c (gradnormlorp/galore): each M x N gradient is reshaped
    to (M c, N / c) and projected on the right, so the state is M c x rank; c must divide every
    projected matrix's columns. 1: GaLore's rows (see docs/vlorp.md)."""
    random_basis: str = "gaussian"
    """With --proj-type random: gaussian (N(0, 1) entries) or rademacher (+-1) bases."""
    projection_seed: int = 0
    """With --proj-type random: the seed every random basis is derived from (per parameter and
    refresh window; never stored, never broadcast)."""
    second_moment: str = "adam"
    """adam (a low-rank v), or factored (ProjFactor: row and column sums of the full-shape
    squared gradient, M + N floats per matrix, Adam's eps convention)."""
    per_layer: bool = False
    """gradnormlorp/galore: update each parameter inside the backward pass and free its gradient
    (with --grad-accum: low-rank gradient sums; --grad-clip then clips each parameter's update
    input on its own, there being no global gradient norm). Several processes: needs
    --grad-reduction owners and --grad-clip 0."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    world_size: int | None = None
    """Processes this job must have; training is refused if the launcher started another number
    (default: whatever the launcher started)."""
    deepspeed: str | None = None
    """A DeepSpeed JSON (see ds_configs/): train through deepspeed.initialize with ZeRO 0-3;
    its "auto" values are filled from these flags (batch, accumulation, clip, bf16). Under
    accelerate launch --use_deepspeed, the plugin's --deepspeed_config_file."""
    fsdp: bool = False
    """Shard the model with FSDP2 (torch's fully_shard per decoder layer, then the root) instead
    of DDP: each rank keeps its rows of every weight, gradient and optimizer state, and
    checkpoints are torch.distributed.checkpoint shards that resume on any number of processes.
    Not with --deepspeed, --per-layer or --grad-reduction owners."""
    grad_reduction: str = "auto"
    """With several processes: lowrank (the optimizer reduces only each projected matrix's
    low-rank gradient to its owner, which broadcasts the low-rank update; dense blocks are
    reduced to their owners and broadcast: fewer bytes than DDP + AdamW, the same math), owners
    (every gradient block reduced in full to its owner: DDP + AdamW's traffic), ddp (DDP
    all-reduces every gradient, owners broadcast updated weights: 1.5x DDP + AdamW's traffic),
    or auto (lowrank for a projected optimizer without --deepspeed/--fsdp, else ddp)."""
    overlap_reduction: str = "on"
    """With --grad-reduction lowrank: start each matrix's low-rank reduce inside the backward pass
    as soon as its gradient is final, overlapping the rest of backward (on), or in the optimizer
    step (off). The weights are bitwise the same either way (benchmarks/overlap.py measures the
    step time of both)."""
    seed: int = 0
    """Seeds model init, data order and every RNG: same seed, same run (bitwise on a CPU)."""
    data: str = "shakespeare"
    """shakespeare (embedded, offline), a .txt/.jsonl file or folder, or a hub dataset name
    (e.g. allenai/c4, streamed)."""
    data_config: str | None = None
    """Hub dataset configuration, e.g. en for allenai/c4."""
    text_field: str = "text"
    """Field holding the text in .jsonl rows and hub datasets."""
    tokenizer: str | None = None
    """Tokenizer folder (or hub name); default: the LLaMA SentencePiece model of mistral-common."""
    eval_fraction: float = 0.05
    """Fraction of the blocks held out for evaluation (local and embedded data)."""
    eval_every: int = 0
    """Evaluate every this many steps; 0: only at the end."""
    eval_batches: int = 16
    """Micro-batches per evaluation; 0: the whole held-out split."""
    output_dir: str | None = None
    """Where checkpoints and the final model go (default: runs/<model>-<optimizer>)."""
    save_every: int = 100
    """Checkpoint every this many steps (and always at the last step); 0: only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints; 0 keeps all."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), never, or a checkpoint folder
    (or a run's output folder: its newest checkpoint)."""
    log_every: int = 10
    """Print a log line every this many steps."""
    progress: bool = True
    """Show a progress bar (--no-progress hides it)."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the class source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): flags just lose their help text
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


_CHOICES = {
    "optimizer": OPTIMIZERS,
    "autocast": AUTOCAST_DTYPES,
    "device": DEVICES,
    "proj_type": OPTIMIZER_PROJ_TYPES,
    "random_basis": BASIS_KINDS,
    "second_moment": SECOND_MOMENTS,
    "bits": (32, 8),
    "proj_bits": (16, 8, 4),
    "svd_method": SVD_METHODS,
    "grad_reduction": GRAD_REDUCTIONS,
    "clip_norm_of": CLIP_NORMS,
    "overlap_reduction": OVERLAP_REDUCTIONS,
    "on_nonfinite": NON_FINITE_POLICIES,
}
_TYPES = {"int": int, "float": float, "str": str}
_METAVARS = {"int": "N", "float": "X", "str": "STR"}
_NAMED_METAVARS = {
    "model": "NAME", "model_config": "PATH", "data": "NAME|PATH", "tokenizer": "PATH",
    "output_dir": "PATH", "resume": "auto|never|PATH", "data_config": "NAME",
    "text_field": "FIELD", "dtype": "fp32|bf16",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per :class:`RunConfig` field, helped by its docstring."""
    parser = argparse.ArgumentParser(
        prog="gnlorp-train",
        description="Pre-train a LLaMA model with GradNormLoRP, GaLore or AdamW. With no "
        "arguments: a short llama_nano run on the embedded Shakespeare corpus.",
    )
    docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        help_text = docs.get(f.name, "")
        if not any(f.default is v for v in (None, False, True)) and "default" not in help_text:
            help_text += f" (default: {f.default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        flag = f"--{f.name.replace('_', '-')}"
        if f.type == "bool" and f.default is True:
            parser.add_argument(
                f"--no-{f.name.replace('_', '-')}",
                dest=f.name,
                action="store_false",
                help=help_text,
            )
        elif f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            base = str(f.type).split("|")[0].strip()
            parser.add_argument(
                flag,
                type=_TYPES[base],
                default=f.default,
                choices=_CHOICES.get(f.name),
                help=help_text,
                metavar=None
                if f.name in _CHOICES
                else _NAMED_METAVARS.get(f.name, _METAVARS[base]),
            )
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def config_from_namespace(namespace: argparse.Namespace) -> RunConfig:
    fields = vars(namespace).copy()
    fields.pop("local_rank", None)
    return RunConfig(**fields)


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    return config_from_namespace(build_parser().parse_args(argv))


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
    """``--grad-reduction`` with ``auto`` resolved for ``world_size`` processes."""
    if config.grad_reduction != "auto":
        return config.grad_reduction
    engine = config.deepspeed is not None or config.fsdp
    if world_size > 1 and config.optimizer != "adamw" and not engine:
        return "lowrank"
    return "ddp"


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
    if config.grad_reduction not in ("auto", "ddp"):
        clashes.append(
            f"--grad-reduction {config.grad_reduction} (FSDP2 reduce-scatters every gradient "
            "to the rank holding its rows)"
        )
    if clashes:
        raise ValueError(
            "--fsdp cannot be combined with " + "; ".join(clashes) + ". Drop those flags, or "
            "drop --fsdp (DDP supports them)"
        )


def resolve(config: RunConfig) -> tuple[RunConfig, Any]:
    """Validate ``config`` and fill its recipe defaults; returns it with its ``LlamaConfig``.

    Every user mistake raises ValueError naming the value.
    """
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
        flag
        for flag, value, default in (
            ("--proj-bits", config.proj_bits, 16),
            ("--svd-method", config.svd_method, "auto"),
            ("--lazy-refresh-threshold", config.lazy_refresh_threshold, 0.0),
            ("--granularity", config.granularity, 1),
            ("--random-basis", config.random_basis, "gaussian"),
            ("--projection-seed", config.projection_seed, 0),
            ("--second-moment", config.second_moment, "adam"),
        )
        if value != default
    ]
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
    if config.grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(
            f"unknown grad_reduction {config.grad_reduction!r}; choose one of {GRAD_REDUCTIONS}"
        )
    if config.overlap_reduction not in OVERLAP_REDUCTIONS:
        raise ValueError(
            f"unknown --overlap-reduction {config.overlap_reduction!r}; choose one of "
            f"{OVERLAP_REDUCTIONS}"
        )
    if config.clip_norm_of not in CLIP_NORMS:
        raise ValueError(
            f"unknown --clip-norm-of {config.clip_norm_of!r}; choose one of {CLIP_NORMS}"
        )
    if config.optimizer == "adamw" and (
        config.grad_reduction in ("owners", "lowrank") or config.clip_norm_of == "consumed"
    ):
        raise ValueError(
            f"--grad-reduction {config.grad_reduction} / --clip-norm-of {config.clip_norm_of} "
            "need a projected optimizer (gradnormlorp or galore): torch's AdamW neither reduces "
            "gradients nor clips; use --grad-reduction ddp --clip-norm-of full with adamw"
        )
    if config.deepspeed is not None:
        if config.autocast != "none":
            raise ValueError(
                f"--autocast {config.autocast} with --deepspeed: DeepSpeed casts the model "
                "itself; use --dtype bf16 (DeepSpeed's bf16 mode keeps fp32 masters) and "
                "--autocast none"
            )
        if config.per_layer or config.grad_reduction not in ("auto", "ddp"):
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
    recipe = recipe_for_config(llama)
    model_label = Path(config.model_config).stem if config.model_config else config.model
    default_lr = ADAMW_DEFAULT_LR if config.optimizer == "adamw" else recipe.lr
    rank = config.rank if config.rank is not None else recipe.rank
    if config.lora_rank is not None:
        # In LoRA mode the projected matrices are the adapters, of rank lora_rank at most.
        if config.rank is not None and config.rank > config.lora_rank:
            raise ValueError(
                f"--rank {config.rank} exceeds --lora-rank {config.lora_rank}: the projected "
                "matrices are the LoRA factors; use --rank <= --lora-rank"
            )
        rank = min(rank, config.lora_rank)
    resolved = dataclasses.replace(
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
    return resolved, llama


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
    return json.loads(json.dumps(record))  # exactly what reading the JSON file back gives
