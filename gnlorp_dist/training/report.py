"""What a ``gnlorp-train`` run says about itself: its setup before the first step, and after the
last one the GPU memory its steps took beside what ``gnlorp-memory`` estimates for them.

Lines go through :func:`gnlorp_dist.training.setup.log` (rank 0 only, beside the progress bar);
the loop's own step and summary lines are in :mod:`gnlorp_dist.training.run`.
"""

from __future__ import annotations

from gnlorp_dist.device import describe_memory
from gnlorp_dist.models import count_parameters
from gnlorp_dist.training.clip_rule import clips_full_gradient
from gnlorp_dist.training.setup import Run, log


def describe_run(run: Run) -> None:
    """Log the model, the optimizer's recipe, the data and where a resumed run starts."""
    c = run.config
    total, trainable = count_parameters(run.model), count_parameters(run.model, True)
    precision = c.dtype + (f", autocast {c.autocast}" if c.autocast != "none" else "")
    if run.device.type == "cuda":
        precision += f", TF32 {'on' if c.tf32 else 'off'}"
    log(
        f"model {c.model_config or c.model}: {total:,} parameters ({trainable:,} trainable), "
        f"{precision}, on {run.device}"
    )
    recipe = ""
    if c.optimizer != "adamw":
        recipe = f", rank {c.rank}, T {c.update_proj_gap}, scale {c.scale}, {c.proj_type}"
        recipe += f", LoRA rank {c.lora_rank}" if c.lora_rank else ""
    log(
        f"optimizer {c.optimizer}: lr {c.lr:g}, warmup {c.warmup_steps}, cosine to "
        f"{c.min_lr_ratio:g}x, clip {clip_description(run)}{recipe}"
    )
    log(f"data {run.data.description}; batch {c.batch_size} x {c.grad_accum} x {c.seq_len} tokens")
    if run.resumed_from is not None:
        log(f"resumed from {run.resumed_from} (step {run.start_step})")
        if run.start_step >= c.max_steps:
            log(f"already at --max-steps {c.max_steps}: nothing to train (raise it to continue)")


def clip_description(run: Run) -> str:
    """``--grad-clip`` in words: off, or its bound and the norm it bounds."""
    c = run.config
    if not c.grad_clip:
        return "off"
    if run.per_layer is not None:
        return f"{c.grad_clip:g} per parameter (the tensor each update consumes)"
    if clips_full_gradient(c, run.context.world_size):
        return f"{c.grad_clip:g} (global norm of the whole gradient, --clip-norm-of full)"
    return (
        f"{c.grad_clip:g} (global norm of what the optimizer consumes: each projected "
        "matrix's low-rank gradient and each dense gradient, --clip-norm-of consumed)"
    )


def estimated_peak_bytes(run: Run) -> int | None:
    """What ``gnlorp-memory`` estimates for this run's setup, or None where it models none
    (DeepSpeed, LoRA mode, autocast)."""
    c = run.config
    if c.deepspeed or c.lora_rank is not None or c.autocast != "none":
        return None
    from gnlorp_dist.memory.estimator import MemoryConfig, estimate_memory  # noqa: PLC0415

    # A report line must never cost the run its final save: no estimate rather than an error.
    try:
        config = MemoryConfig(
            model=c.model_config or c.model,
            optimizer=c.optimizer,
            bits=c.bits,
            rank=c.rank if c.optimizer != "adamw" else None,
            proj_type=c.proj_type,
            per_layer=c.per_layer,
            accumulation_steps=c.grad_accum,
            tokens=c.batch_size * c.seq_len,
            seq_len=c.seq_len,
            dtype=c.dtype,
            activation_checkpointing=c.activation_checkpointing,
            world_size=run.context.world_size,
            shard_states=run.context.world_size > 1 and c.optimizer != "adamw",
        )
        return estimate_memory(config).total_bytes
    except ValueError as err:
        log(f"no memory estimate for this setup: {err}")
        return None


def log_memory(memory: dict[str, int], estimate: int | None) -> None:
    """Log the training steps' measured GPU ``memory`` (:func:`gnlorp_dist.device.memory_stats`)
    beside ``gnlorp-memory``'s ``estimate`` in bytes (None: no estimate for this setup)."""
    log(
        f"GPU memory of the training steps: {describe_memory(memory)}; gnlorp-memory "
        "estimates "
        + ("(no estimate for this setup)" if estimate is None else f"{estimate / 2**30:.2f} GiB")
    )
