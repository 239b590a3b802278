"""The option groups every command line shares, one small frozen dataclass per concept.

A field's docstring is its flag's ``--help`` in every CLI that has the flag, so it says what the
flag means everywhere; where a CLI's default differs, the docstring names it and why. A field
annotated with a resume rule (``Annotated[str, MUST_MATCH]``, :mod:`gnlorp_dist.options.fields`)
is compared by a resumed
gnlorp-train run with its checkpoint: the model, the dtype, the data and its order, the
optimizer's hyper-parameters that its saved param groups restore. Optimizer
knobs are in :mod:`gnlorp_dist.options.optimizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from gnlorp_dist.device import AUTOCAST_DTYPES, DEVICES
from gnlorp_dist.options.fields import MUST_MATCH, OVERRIDABLE, option

DTYPES: tuple[str, ...] = ("fp32", "bf16")
"""``--dtype`` values (checked when the config is resolved, so fp16 gets its own message)."""


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Which model trains (or is priced)."""

    model: Annotated[str, MUST_MATCH] = option("llama_nano", metavar="NAME|PATH")
    """The model: a named LLaMA shape and recipe (llama_nano, llama_micro, llama_60m ...
    llama_7b; default llama_nano) in gnlorp-train, gnlorp-bench and gnlorp-memory (which also
    takes a config JSON or a folder holding config.json, and needs --model or --model-config);
    in gnlorp-finetune a built-in classifier (tiny-roberta, tiny-bert, tiny-bart: random init,
    offline; the default tiny-roberta), a local model folder or a hub name such as
    roberta-base."""
    model_config: str | None = option(None, metavar="PATH")
    """A config JSON that replaces --model: a GaLore-style JSON or a Hugging Face config.json of
    a LLaMA (gnlorp-finetune: of a classifier, e.g. {"model_type": "roberta", ...}), with random
    init."""


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """Where a run computes (:mod:`gnlorp_dist.device`)."""

    device: str = option("auto", metavar="|".join(DEVICES) + "[:N]")
    """auto (cuda:<LOCAL_RANK> when torch sees a GPU, else the CPU), cpu, cuda (this process's
    GPU) or cuda:N (GPU N); a cuda device is an error when torch sees none. Several gnlorp-train processes on GPUs talk
    over NCCL, on CPUs over gloo; on a GPU gnlorp-bench adds each method's peak GPU memory and
    tokens/s to its report."""
    tf32: bool = True
    """TF32 matmuls on Ampere and newer GPUs (--no-tf32 keeps full fp32 matmuls); no effect on
    the CPU."""


@dataclass(frozen=True, kw_only=True)
class PrecisionOptions:
    """The dtype of the weights and states, and mixed precision."""

    dtype: Annotated[str, MUST_MATCH] = option("fp32", metavar="fp32|bf16")
    """fp32, or bf16 (pure bf16 weights and states, GaLore's single-GPU recipe). fp16 is
    refused: it needs loss scaling, which the projected update does not do. gnlorp-memory's
    default is bf16 (the 7B single-GPU recipe it prices)."""
    autocast: str = option("none", choices=AUTOCAST_DTYPES)
    """none, or bf16: fp32 master weights and optimizer states, matmuls in bf16 under
    torch.autocast (needs --dtype fp32)."""


@dataclass(frozen=True, kw_only=True)
class ScheduleOptions:
    """The learning-rate schedule and the update's regularisation."""

    lr: Annotated[float | None, OVERRIDABLE] = None
    """Peak learning rate (default: the model's recipe for the projected optimizers, 1e-3 for
    adamw; gnlorp-finetune 3e-5 pre-trained, 2e-3 random init, AdamW 2e-5 / 1e-3, WeGeFT
    4e-4 / 2e-3; in gnlorp-bench the projected methods' lr, the others take --adamw-lr)."""
    weight_decay: Annotated[float, MUST_MATCH] = 0.0
    """Decoupled weight decay."""
    warmup_steps: int | None = None
    """Linear warmup steps (default: 10% of the steps), then cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine decays to min_lr_ratio * lr."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this before the step; 0 disables."""


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """What the model reads, in which order, and how much of it per step."""

    data: Annotated[str, MUST_MATCH] = option("shakespeare", metavar="NAME|PATH")
    """shakespeare (embedded, offline), a .txt/.jsonl file or folder, or (gnlorp-train) a hub
    dataset name (e.g. allenai/c4, streamed)."""
    tokenizer: Annotated[str | None, MUST_MATCH] = option(None, metavar="PATH")
    """Tokenizer folder or hub name (default: the LLaMA SentencePiece model of mistral-common;
    gnlorp-finetune: the model's own, or for random-init models a word-level tokenizer learnt
    from the training split)."""
    seq_len: Annotated[int | None, MUST_MATCH] = 256
    """Tokens per sequence (default 256; gnlorp-bench 128, which keeps its eight methods within
    minutes on 2 CPU cores; gnlorp-memory: one sequence of --tokens tokens)."""
    batch_size: int = 4
    """Sequences (examples) per micro-batch and process (default 4; gnlorp-finetune 16,
    GaLore's GLUE batch). gnlorp-train steps on --grad-accum micro-batches of every process;
    gnlorp-bench on one."""
    eval_batches: int = 16
    """Held-out micro-batches per evaluation (default 16, 0: the whole held-out split;
    gnlorp-bench 8)."""
    seed: Annotated[int, MUST_MATCH] = 0
    """Seeds model init, data order and every RNG of the run: same seed, same run (bitwise on a
    CPU)."""


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """Which method trains, and its LoRA / weight-norm settings."""

    optimizer: Annotated[str, MUST_MATCH] = "gradnormlorp"
    """The method: gradnormlorp (weight norm + projected AdamW), galore (projection, no weight
    norm), adamw; gnlorp-finetune also wegeft (alias --method; frozen body, AdamW on generated
    updates, see docs/finetune.md); gnlorp-memory also adamw8bit (bitsandbytes' AdamW8bit)."""
    lora_rank: Annotated[int | None, MUST_MATCH] = None
    """LoRA adapter rank. gnlorp-train and gnlorp-finetune: gradnormlorp only, LoRA mode (V = W0
    + s B A, W0 frozen, the adapters projected; in gnlorp-finetune embeddings and body frozen,
    head trained). gnlorp-bench: the rank of its lora, dora and wegeft methods (default:
    --rank)."""
    lora_alpha: float | None = None
    """LoRA (and WeGeFT) scaling numerator: s = alpha / adapter rank (default: alpha = the
    adapter rank)."""
    detach_norm: Annotated[bool, MUST_MATCH] = False
    """gradnormlorp only: treat ||V|| as a constant in backward, as DoRA does."""


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """How long a run goes, what it logs and where it writes."""

    max_steps: int = 120
    """Optimizer steps to train for (gnlorp-train, default 120; a resumed run continues up to
    this); gnlorp-finetune: stop after this many (default 0: --epochs decides)."""
    eval_every: int = 0
    """Evaluate every this many steps; 0 (the default): only at the end (gnlorp-finetune: at
    the end of every epoch). Always at the end."""
    log_every: int = 10
    """Print a log line (gnlorp-bench: one per method) every this many steps."""
    output_dir: str | None = option(None, metavar="PATH")
    """Where the results go (default: runs/<model>-<optimizer> for gnlorp-train's checkpoints
    and final model, runs/finetune-<data>-<model>-<optimizer> for gnlorp-finetune's merged
    model and metrics, benchmarks/results/compare for gnlorp-bench's table, JSON, log and
    plots)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <output-dir>/tensorboard (needs the tensorboard
    package)."""
    threads: int | None = None
    """CPU threads torch uses. gnlorp-bench's default 1: on a machine whose cores other
    processes share, OpenMP threads spin-wait for each other (a 2-thread step was measured up to
    6x slower); pass the core count on an idle machine. gnlorp-finetune's default: 1 for models
    of hidden size < 256 (too small to split), torch's default otherwise."""


@dataclass(frozen=True, kw_only=True)
class ParallelOptions:
    """How many processes run, and how the step's memory is spent."""

    world_size: int | None = None
    """Data-parallel processes. gnlorp-train refuses to train if the launcher started another
    number (default: whatever the launcher started); gnlorp-memory prices a job of this many
    ranks (default 1)."""
    per_layer: bool = False
    """gradnormlorp/galore: update each parameter inside the backward pass and free its gradient
    (with --grad-accum: low-rank gradient sums; --grad-clip then clips each parameter's update
    input on its own, there being no global gradient norm). Several gnlorp-train processes:
    needs --grad-reduction full or low_rank and --grad-clip 0."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them."""
