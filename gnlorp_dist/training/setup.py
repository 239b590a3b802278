"""Everything a ``gnlorp-train`` run holds, built and resumed before the first step.

:func:`prepare` resolves a :class:`RunConfig`, puts the model on its device, builds the optimizer,
the schedule and the data, wraps the model for data parallelism (or starts DeepSpeed's engine)
and resumes from a checkpoint; the loop in :mod:`gnlorp_dist.training.run` then only steps.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig

from gnlorp_dist.checkpoint.dcp import check_layout_matches, load_dcp_training_checkpoint
from gnlorp_dist.checkpoint.manifest import acquire_lock
from gnlorp_dist.checkpoint.space import human_bytes, remove_leftovers, space_holders
from gnlorp_dist.checkpoint.store import (
    all_checkpoints,
    begin_branch_if_needed,
    check_checkpoint,
    checkpoints_root,
    load_checkpoint,
    read_run_config,
    select_checkpoint,
)
from gnlorp_dist.data.loader import TrainData, build_data
from gnlorp_dist.device import activate_device, resolve_device
from gnlorp_dist.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    fully_shard_model,
    init_single_process_group,
    wrap_for_data_parallel,
)
from gnlorp_dist.models import build_model
from gnlorp_dist.nn import DEFAULT_TARGET_MODULES, apply_weight_norm
from gnlorp_dist.optim import GradNormLoRPAdamW, PerLayerUpdates, projected_param_groups
from gnlorp_dist.training import deepspeed_step
from gnlorp_dist.training.clip_rule import effective_clip_norm_of, resolve_clip_norm_of
from gnlorp_dist.training.config import (
    RunConfig,
    check_project_lm_head,
    config_record,
    effective_grad_reduction,
    resolve,
)
from gnlorp_dist.training.faults import check_fault_env
from gnlorp_dist.training.preflight import (
    NotEnoughSpace,
    check_free_space,
    check_output_dir,
    checkpoint_bytes_estimate,
    merged_model_bytes_estimate,
    run_writes,
)
from gnlorp_dist.training.resume_settings import check_resume_settings, parse_overrides
from gnlorp_dist.training.schedule import rebase_peak_lr, warmup_cosine_schedule

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_LOG_RANK = [0]


def set_log_rank(rank: int) -> None:
    """Only rank 0 prints :func:`log` lines."""
    _LOG_RANK[0] = rank


def log(message: str) -> None:
    """A plain log line on stdout (rank 0 only) that does not break the progress bar."""
    if _LOG_RANK[0] != 0:
        return
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------- building


def build_training_model(
    config: RunConfig, llama: LlamaConfig, device: torch.device | str = "cpu"
) -> nn.Module:
    """The model as it trains, on ``device``: weight-normalised targets for gradnormlorp,
    plain otherwise."""
    # Under DeepSpeed the model starts in fp32 on the host: the engine moves it to its device,
    # and its bf16 mode casts it and keeps fp32 masters.
    dtype = torch.float32 if config.deepspeed else _DTYPES[config.dtype]
    device = "cpu" if config.deepspeed else device
    model = build_model(llama, dtype=dtype, seed=config.seed, device=device)
    if config.optimizer == "gradnormlorp":
        apply_weight_norm(model, lora_rank=config.lora_rank, detach_norm=config.detach_norm)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_optimizer(
    config: RunConfig, model: nn.Module, context: DistributedContext = SINGLE_PROCESS
) -> torch.optim.Optimizer:
    """Projected AdamW (gradnormlorp, galore) or torch's AdamW over every trainable parameter.

    With several processes the projected optimizer shards its state over them; torch's AdamW
    (the baseline) is replicated, as under plain DDP."""
    if config.optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=config.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=config.weight_decay
        )
    # Only the options asked for: the groups stay GaLore's keys (docs/vlorp.md).
    options = {**config.projection_group_options(), **config.moment_group_options()}
    if config.project_lm_head:  # the default targets, and lm_head (gradient projected, no norm)
        options["target_modules"] = lm_head_targets(config, model)
    groups = projected_param_groups(
        model, config.rank, config.update_proj_gap, config.scale, config.proj_type, **options
    )
    reduction = effective_grad_reduction(config, context.world_size)
    consumed = effective_clip_norm_of(config, context.world_size) == "consumed"
    return GradNormLoRPAdamW(
        groups,
        lr=config.lr,
        weight_decay=config.weight_decay,
        bits=config.bits,
        communicator=context.communicator,
        gradient_reduction=reduction if context.world_size > 1 else "none",
        max_grad_norm=config.grad_clip if consumed and not config.per_layer else 0.0,
    )


def lm_head_targets(config: RunConfig, model: nn.Module) -> tuple[str, ...]:
    """``target_modules`` that add ``model``'s lm_head to the default projected matrices
    (--project-lm-head); ValueError where lm_head cannot be projected."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"--project-lm-head: {type(model).__name__} has no nn.Linear lm_head "
            f"(output embeddings: {type(head).__name__}); drop --project-lm-head"
        )
    # resolve() refused a tied config already; this catches a model tied some other way.
    check_project_lm_head(config, tied=embedding is not None and head.weight is embedding.weight)
    return (*DEFAULT_TARGET_MODULES, "lm_head")


def build_train_data(config: RunConfig, rank: int = 0, world_size: int = 1) -> TrainData:
    return build_data(
        data=config.data,
        data_config=config.data_config,
        text_field=config.text_field,
        tokenizer=config.tokenizer,
        seq_len=config.seq_len,
        eval_fraction=config.eval_fraction,
        global_batch=config.batch_size * config.grad_accum * world_size,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        stream_eval_blocks=(config.eval_batches or 16) * config.batch_size,
    )


@dataclass(kw_only=True)
class Run:
    """Everything a training loop holds, built (and resumed) by :func:`prepare`."""

    config: RunConfig
    """The resolved configuration (recipe defaults filled in)."""
    llama: LlamaConfig
    """The model's transformers config."""
    model: nn.Module
    """The model itself (evaluated, saved and merged)."""
    forward_model: nn.Module
    """What the training step calls: ``model`` (also when sharded by FSDP2), or its DDP
    wrapper."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: TrainData
    context: DistributedContext = SINGLE_PROCESS
    """This process's place in the job."""
    device: torch.device = torch.device("cpu")
    """Where the model, the batches and the optimizer state live (the engine's under
    DeepSpeed)."""
    per_layer: PerLayerUpdates | None = None
    """Set when --per-layer: the backward pass steps the optimizer."""
    engine: Any = None
    """The DeepSpeed engine when --deepspeed (it steps the optimizer and saves checkpoints)."""
    start_step: int = 0
    """Optimizer steps already done (from the checkpoint resumed, else 0)."""
    resumed_from: Path | None = None
    skips_in_a_row: int = 0
    """Steps skipped in a row for a non-finite gradient up to ``start_step`` (the checkpoint's
    count on a resume): ``--max-consecutive-skips`` counts across restarts."""
    write_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    """Estimated bytes of one ``checkpoint`` and of the ``merged`` model (see
    :func:`check_space_for_run`)."""


def merged_dtype(config: RunConfig) -> torch.dtype:
    """The dtype the merged model is saved in: the run's ``--dtype`` (under DeepSpeed merged
    from the fp32 masters, then cast)."""
    return _DTYPES[config.dtype]


def check_space_for_run(run: Run) -> None:
    """:class:`~gnlorp_dist.training.preflight.NotEnoughSpace` unless the output folder has room for
    what :func:`gnlorp_dist.training.run.run_training` will write (:func:`run_writes`), after
    rank 0 removed the partial folders of killed saves (logged). Every rank checks the same
    numbers (all write checkpoint shards), so they fail together; the error lists what fills
    the folder."""
    c = run.config
    if run.context.is_main:
        removed = remove_leftovers(c.output_dir, checkpoints_root(c.output_dir))
        if removed:
            listed = ", ".join(f"{path.name} ({human_bytes(size)})" for path, size in removed)
            log(f"removed the partial folders of interrupted saves in {c.output_dir}: {listed}")
    run.context.barrier()
    writes = run_writes(
        checkpoint_bytes=run.write_bytes.get("checkpoint", 0),
        merged_bytes=run.write_bytes.get("merged", 0),
        start_step=run.start_step,
        max_steps=c.max_steps,
    )
    try:
        check_free_space(c.output_dir, writes)
    except NotEnoughSpace as err:
        raise NotEnoughSpace(f"{err}. {_what_fills(c.output_dir)}") from None


def check_space_for_save(run: Run, step: int) -> None:
    """:class:`NotEnoughSpace` unless the output folder has room for the checkpoint of ``step``
    (and, at the last step, the merged model written next), before anything is written: the
    older checkpoints are pruned only once the new one is complete."""
    c = run.config
    needed = {f"the checkpoint of step {step}": run.write_bytes.get("checkpoint", 0)}
    if step == c.max_steps:
        needed["the merged model"] = run.write_bytes.get("merged", 0)
    try:
        check_free_space(c.output_dir, needed)
    except NotEnoughSpace as err:
        raise NotEnoughSpace(
            f"{err}. Nothing of step {step} was written and the checkpoints on disk are kept: "
            f"run the same command again to resume once there is room. {_what_fills(c.output_dir)}"
        ) from None


def _what_fills(output_dir: str) -> str:
    return (
        f"What fills {output_dir}: {space_holders(output_dir)} (older branches' checkpoints are "
        "never pruned: delete the ones you no longer need)"
    )


def find_resume_checkpoint(config: RunConfig) -> Path | None:
    """The checkpoint to resume, verified against its manifest.

    ``auto``: the current branch's newest checkpoint that verifies (each one skipped is a
    warning naming the file at fault; a ValueError when none verifies); ``never``: None, or a
    ValueError when the folder already holds checkpoints; a path: that checkpoint, or, for a
    run's output folder, its newest verified one."""
    if config.resume == "auto":
        return select_checkpoint(config.output_dir)
    if config.resume == "never":
        found = all_checkpoints(config.output_dir)
        if found:
            raise ValueError(
                f"--resume never, but {config.output_dir!r} already holds checkpoints "
                f"(newest {found[-1][2].name}); use --resume auto or another --output-dir"
            )
        return None
    path = Path(config.resume)
    if checkpoints_root(path).is_dir():  # a run's output folder stands for its newest checkpoint
        chosen = select_checkpoint(path)
        if chosen is not None:
            return chosen
    check_checkpoint(path)
    return path


def prepare(config: RunConfig, context: DistributedContext = SINGLE_PROCESS) -> Run:
    """Resolve ``config``, build model, optimizer, schedule and data, and resume if asked.

    User mistakes raise ValueError before any training happens.
    """
    check_fault_env()  # a misspelt fault point fails now, not at the step it names
    config, llama, device = _resolve_for_process(config, context)
    run = _build_run(config, llama, context, device)
    if config.deepspeed:
        _start_deepspeed(run)
        return run
    _resume(run)
    if not config.fsdp:  # an FSDP2 model is its own data-parallel wrapper
        reduction = effective_grad_reduction(config, context.world_size)
        run.forward_model = wrap_for_data_parallel(run.model, context, reduction)
    if config.per_layer:
        run.per_layer = PerLayerUpdates(
            run.optimizer, accumulation_steps=config.grad_accum, max_grad_norm=config.grad_clip
        )
    if config.overlap_directions == "on":
        _apply_directions_in_forward(run)
    return run


def _apply_directions_in_forward(run: Run) -> None:
    """``--overlap-directions on``: the optimizer's forward hooks where the low-rank reduction
    runs; elsewhere the flag changes nothing, and the log says why."""
    config, world = run.config, run.context.world_size
    reduction = effective_grad_reduction(config, world)
    if reduction == "low_rank" and not config.per_layer and not config.fsdp:
        run.optimizer.applying_directions_in_forward(run.model)  # type: ignore[attr-defined]
        log("directions applied in the next forward (--overlap-directions on)")
        return
    why = "--per-layer" if config.per_layer else f"--grad-reduction {reduction}"
    log(
        f"--overlap-directions on has no effect with {why} on {world} process(es): only the "
        "low-rank reduction (several processes, not --per-layer or --fsdp) defers directions"
    )


def _resolve_for_process(
    config: RunConfig, context: DistributedContext
) -> tuple[RunConfig, LlamaConfig, torch.device]:
    """``config`` resolved (recipe defaults, the clipping rule), its model's config, and this
    process's device, activated; the output folder is checked and, on rank 0, locked."""
    if config.deepspeed is None:
        config = dataclasses.replace(config, deepspeed=deepspeed_step.accelerate_config_file())
    config, llama = resolve(config)
    check_output_dir(config.output_dir)  # a writable folder (space: once the model is built)
    if context.is_main:  # before anything reads or writes the folder; released at exit
        acquire_lock(config.output_dir)
    device = resolve_device(config.device, context.local_rank)
    if context.world_size > 1 and device != context.device:
        raise ValueError(
            f"--device {config.device} means {device} for local rank {context.local_rank}, but "
            f"the job's process group was set up for {context.device}; pass the same --device "
            "to init_distributed"
        )
    # Before anything allocates on the GPU: otherwise every rank leaves a context on GPU 0.
    activate_device(device, tf32=config.tf32)
    reduction = effective_grad_reduction(config, context.world_size)
    if context.world_size > 1 and config.per_layer and reduction == "none":
        raise ValueError(
            f"--per-layer with {context.world_size} processes needs --grad-reduction low_rank or "
            "full: the hooks reduce each gradient to its owner themselves, and DDP would "
            "reduce it again"
        )
    if context.world_size > 1 and config.per_layer and config.grad_clip > 0:
        raise ValueError(
            f"--per-layer with {context.world_size} processes cannot clip: a dense tensor's "
            "gradient is split over the ranks owning its row blocks, so no rank has a "
            f"per-parameter norm for --grad-clip {config.grad_clip:g}; pass --grad-clip 0"
        )
    # The rule run_config.json records (never auto; a resume keeps its checkpoint's rule),
    # refused where no rank can compute its norm.
    config = resolve_clip_norm_of(config, context.world_size, log)
    return config, llama, device


def _build_run(
    config: RunConfig, llama: LlamaConfig, context: DistributedContext, device: torch.device
) -> Run:
    """Seed, then build the data, the model (sharded under --fsdp), the optimizer and the
    schedule, in that order: a fresh run's random draws follow it."""
    seed_everything(config.seed)
    data = build_train_data(config, context.rank, context.world_size)
    if len(data.tokenizer) > llama.vocab_size:
        raise ValueError(
            f"tokenizer {config.tokenizer or 'default'!r} has {len(data.tokenizer)} tokens but the "
            f"model's vocab_size is {llama.vocab_size}; use --model-config with a larger vocab_size"
        )
    model = build_training_model(config, llama, device)
    if config.fsdp:
        # Alone (e.g. resuming an N-rank checkpoint on one process) FSDP2 and DCP still need a
        # process group. The optimizer is built after sharding: it must hold the DTensor shards.
        init_single_process_group(device)
        fully_shard_model(model)
    optimizer = build_optimizer(config, model, context)
    # Estimated now, from the whole shapes (an engine partitions them); checked by the loop.
    write_bytes = {
        "checkpoint": checkpoint_bytes_estimate(model, optimizer),
        "merged": merged_model_bytes_estimate(llama, merged_dtype(config)),
    }
    scheduler = warmup_cosine_schedule(
        optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio
    )
    return Run(
        config=config,
        llama=llama,
        model=model,
        forward_model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        context=context,
        device=device,
        write_bytes=write_bytes,
    )


def _start_deepspeed(run: Run) -> None:
    """Start DeepSpeed's engine over the run's model and optimizer, resumed from the checkpoint
    ``--resume`` picks (the engine then steps, saves and holds the device)."""
    checkpoint, client_state = deepspeed_step.resume_point(run)
    if checkpoint is None:
        _log_unused_overrides(run.config)
    else:
        assert client_state is not None
        record = config_record(run.config, run.llama)
        check_resume_settings(client_state["run_config"], record, run.config, str(checkpoint), log)
    run.engine, _ = deepspeed_step.start_engine(run, checkpoint)
    run.forward_model = run.engine
    run.device = torch.device(run.engine.device)
    log(deepspeed_step.describe(run.engine, run.context.world_size))
    if checkpoint is not None:
        branch = deepspeed_step.restore_client_state(run, client_state, checkpoint)
        resume_counters_and_overrides(run, int(client_state.get("skips_in_a_row", 0)))
        if branch is not None:
            _log_new_branch(checkpoint, run.config.output_dir, branch)


def _resume(run: Run) -> None:
    """Load the checkpoint ``--resume`` picks, if any, into the run's model, optimizer, schedule
    and data position (refusing one whose settings or layout differ), starting a new branch
    when it is not its branch's newest."""
    config, context = run.config, run.context
    checkpoint = find_resume_checkpoint(config)
    if checkpoint is None:
        _log_unused_overrides(config)
        return
    saved_config = read_run_config(checkpoint)
    check_resume_settings(
        saved_config, config_record(config, run.llama), config, str(checkpoint), log
    )
    check_layout_matches(checkpoint, config.fsdp)
    if config.fsdp:
        state = load_dcp_training_checkpoint(
            checkpoint, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler
        )
    else:
        state = load_checkpoint(
            checkpoint,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            device=run.device,
            verify=False,  # find_resume_checkpoint verified it
        )
    run.data.train.load_state_dict(state.data_state)
    run.start_step, run.resumed_from = state.step, checkpoint
    resume_counters_and_overrides(run, state.skips_in_a_row)
    context.barrier()  # every rank chose its checkpoint before the branch may change
    if context.is_main:
        branch = begin_branch_if_needed(config.output_dir, checkpoint)
        if branch is not None:
            _log_new_branch(checkpoint, config.output_dir, branch)


def resume_counters_and_overrides(run: Run, skips_in_a_row: int) -> None:
    """After the checkpoint is loaded: continue its count of non-finite steps skipped in a row,
    and apply ``--override lr=...`` over the peak lr it restored."""
    run.skips_in_a_row = skips_in_a_row
    if skips_in_a_row:
        log(
            f"the checkpoint's run had skipped its last {skips_in_a_row} steps for a non-finite "
            f"gradient; --max-consecutive-skips {run.config.max_consecutive_skips} keeps counting"
        )
    if "lr" in parse_overrides(run.config):
        rebase_peak_lr(run.scheduler, run.config.lr)


def _log_unused_overrides(config: RunConfig) -> None:
    if config.override:
        log(
            f"--override {' '.join(config.override)}: no checkpoint to resume; the run starts "
            "with these values"
        )


def _log_new_branch(checkpoint: Path, output_dir: str, branch: str) -> None:
    log(
        f"resumed from {checkpoint}, which is not the newest checkpoint of "
        f"{output_dir}: new branch {branch} (older branches are kept)"
    )
