"""``gnlorp-train``: pre-train a LLaMA model with GradNormLoRP, GaLore or AdamW.

Built from small functions (build the model, the optimizer, the data; one step with gradient
accumulation; evaluate; save and load) that a distributed layer can wrap. ``train(config)`` is
the programmatic entry point, ``main(argv)`` the command line (``python -m gnlorp_dist.train``, ``gnlorp-train``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from gnlorp_dist.checkpoint.dcp import save_dcp_training_checkpoint
from gnlorp_dist.checkpoint.merged import (
    model_logits,
    reloaded_logit_difference,
    save_merged_streamed,
)
from gnlorp_dist.checkpoint.store import save_checkpoint
from gnlorp_dist.device import (
    activate_device,
    describe_memory,
    memory_stats,
    resolve_device,
    to_device,
)
from gnlorp_dist.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    init_distributed,
)
from gnlorp_dist.models import count_parameters
from gnlorp_dist.optim.adamw import GradNormLoRPAdamW
from gnlorp_dist.training import deepspeed_step as ds_training
from gnlorp_dist.training.clip_rule import effective_clip_norm_of
from gnlorp_dist.training.config import (
    RunConfig,
    build_parser,
    config_from_namespace,
    config_record,
    effective_grad_reduction,
)
from gnlorp_dist.training.evaluation import evaluate, merged_logit_difference
from gnlorp_dist.training.faults import fault_point
from gnlorp_dist.training.preflight import NotEnoughSpace
from gnlorp_dist.training.setup import (
    Run,
    build_optimizer,
    build_train_data,
    build_training_model,
    check_space_for_run,
    find_resume_checkpoint,
    log,
    merged_dtype,
    prepare,
    seed_everything,
    set_log_rank,
)
from gnlorp_dist.training.steps import StepStats, train_step

__all__ = [
    "Run",
    "build_optimizer",
    "build_train_data",
    "build_training_model",
    "find_resume_checkpoint",
    "seed_everything",
    "StepStats",
    "TrainResult",
    "main",
    "prepare",
    "run_training",
    "train",
    "train_step",
]

# Called after every optimizer step with (step, checkpoint folder saved at that step or None).
StepCallback = Callable[[int, Path | None], None]


# -------------------------------------------------------------------------------------- steps


# --------------------------------------------------------------------------------------- loop


@dataclass(kw_only=True)
class TrainResult:
    final_step: int
    """Optimizer steps completed in total (resumed ones included)."""
    losses: list[float] = field(default_factory=list)
    """Training loss of each step this call ran (a skipped step's may be NaN)."""
    skipped_steps: list[int] = field(default_factory=list)
    """Steps skipped for a non-finite gradient (``--on-nonfinite skip``)."""
    eval_loss: float = math.nan
    eval_perplexity: float = math.nan
    merged_max_abs_logit_diff: float = math.nan
    """Trained model vs the reloaded merged model, on held-out blocks."""
    final_dir: Path | None = None
    """The merged model folder (save_pretrained + tokenizer)."""
    last_checkpoint: Path | None = None
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    """Training throughput of this call (evaluation and saving excluded)."""
    memory: dict[str, int] = field(default_factory=dict)
    """On a GPU: ``max_memory_allocated`` / ``max_memory_reserved`` bytes of the training
    steps (evaluation and saving excluded); empty on the CPU."""
    estimated_peak_bytes: int | None = None
    """On a GPU: the ``gnlorp-memory`` estimate of the same setup, to set beside the measure."""


def _describe(run: Run) -> None:
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
        f"{c.min_lr_ratio:g}x, clip {_clip_description(run)}{recipe}"
    )
    log(f"data {run.data.description}; batch {c.batch_size} x {c.grad_accum} x {c.seq_len} tokens")
    if run.resumed_from is not None:
        log(f"resumed from {run.resumed_from} (step {run.start_step})")
        if run.start_step >= c.max_steps:
            log(f"already at --max-steps {c.max_steps}: nothing to train (raise it to continue)")


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


def save_training_state(run: Run, step: int, loss: float) -> Path:
    """Checkpoint everything needed to continue exactly after ``step``."""
    c = run.config
    if run.engine is not None:
        client_state = {
            "step": step,
            "loss": loss,
            "scheduler": run.scheduler.state_dict(),
            "data_state": run.data.train.state_dict(),
            "run_config": config_record(c, run.llama),
        }
        return ds_training.save(run, step, client_state)
    extra = {
        "loss": loss,
        "tokens_seen": step * c.batch_size * c.grad_accum * c.seq_len * run.context.world_size,
    }
    if c.fsdp:
        return save_dcp_training_checkpoint(
            c.output_dir,
            step=step,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            data_state=run.data.train.state_dict(),
            run_config=config_record(c, run.llama),
            context=run.context,
            keep=c.keep_checkpoints,
            extra=extra,
        )
    return save_checkpoint(
        c.output_dir,
        step=step,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        data_state=run.data.train.state_dict(),
        run_config=config_record(c, run.llama),
        keep=c.keep_checkpoints,
        extra=extra,
        rank=run.context.rank,
        world_size=run.context.world_size,
        barrier=run.context.barrier,
    )


def too_many_skips_error(step: int, in_a_row: int, lr: float) -> FloatingPointError:
    return FloatingPointError(
        f"step {step}: {in_a_row} steps in a row skipped for a non-finite gradient "
        f"(--max-consecutive-skips {in_a_row}); training stopped. The run diverged or the data "
        f"is bad: lower --lr (now {lr:g}), enable or lower --grad-clip, or resume from an "
        "earlier checkpoint."
    )


def _skips(engine: object, optimizer: GradNormLoRPAdamW | None) -> int:
    """Steps skipped so far for a non-finite gradient, by the engine or by our optimizer."""
    skipped = getattr(engine, "skipped_steps", 0)
    ours = optimizer.skipped_steps if optimizer is not None else 0
    return (skipped if isinstance(skipped, int) else 0) + ours


def run_training(run: Run, on_step_end: StepCallback | None = None) -> TrainResult:
    """Train from ``run.start_step`` to ``max_steps``, checkpointing, then evaluate and save the
    merged model, checking it reloads in stock transformers with the same logits.

    A step with a non-finite gradient follows ``--on-nonfinite``: skip (nothing in the model or
    the optimizer changes; the step is logged and still consumes its batch and advances the
    schedule and the step count, as DeepSpeed's and AMP's skipped steps do; a FloatingPointError
    after ``--max-consecutive-skips`` in a row) or raise. A non-finite loss at a step that was
    not skipped raises a FloatingPointError, as before."""
    c = run.config
    check_space_for_run(run)  # before any step: what this run writes must fit
    optimizer = run.optimizer if isinstance(run.optimizer, GradNormLoRPAdamW) else None
    if optimizer is not None:
        optimizer.on_nonfinite = c.on_nonfinite
    in_a_row = 0
    _describe(run)
    result = TrainResult(final_step=run.start_step)
    tokens_per_step = c.batch_size * c.grad_accum * c.seq_len * run.context.world_size
    bar = tqdm(
        total=c.max_steps,
        initial=run.start_step,
        disable=not c.progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    started = time.perf_counter()
    train_time = window_time = 0.0
    window_steps = 0
    for done in range(run.start_step + 1, c.max_steps + 1):
        step_start = time.perf_counter()
        batch = to_device(run.data.train.next_batch(), run.device)
        micro = list(batch.view(c.grad_accum, c.batch_size, c.seq_len))
        if run.engine is not None:
            # DeepSpeed's ZeRO optimizers skip a non-finite step themselves (engine.skipped_steps,
            # fp32 and bf16 too) before calling ours; where they call it, ours skips.
            skipped_before = _skips(run.engine, optimizer)
            stats = ds_training.train_step(run.engine, run.scheduler, micro)
            if _skips(run.engine, optimizer) > skipped_before:
                stats = dataclasses.replace(stats, skipped=True)
        else:
            stats = train_step(
                run.forward_model,
                run.optimizer,
                run.scheduler,
                micro,
                c.grad_clip if _clips_full_gradient(run) else 0.0,
                per_layer=run.per_layer is not None,
                autocast=c.autocast,
                on_nonfinite=c.on_nonfinite,
                reduce_in_backward=c.overlap_reduction == "on",
            )
        if stats.skipped and c.on_nonfinite == "raise":  # an engine that skipped on its own
            raise FloatingPointError(
                f"step {done}: non-finite gradient (--on-nonfinite raise); the engine skipped "
                "the step. Lower --lr or enable --grad-clip."
            )
        if stats.skipped:
            in_a_row += 1
            result.skipped_steps.append(done)
            log(
                f"step {done} skipped: non-finite gradient ({in_a_row} in a row, "
                f"{len(result.skipped_steps)} in total)"
            )
            if in_a_row >= c.max_consecutive_skips:
                raise too_many_skips_error(done, in_a_row, stats.lr)
        else:
            in_a_row = 0
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"loss is {stats.loss} at step {done}; lower --lr")
        step_time = time.perf_counter() - step_start
        train_time, window_time, window_steps = (
            train_time + step_time,
            window_time + step_time,
            window_steps + 1,
        )
        result.losses.append(stats.loss)
        result.final_step = done
        bar.update(1)
        rate = tokens_per_step / step_time
        bar.set_postfix_str(f"loss {stats.loss:.4f}, lr {stats.lr:.2e}, {rate:,.0f} tok/s")
        if done % c.log_every == 0 or done == c.max_steps:
            rate = window_steps * tokens_per_step / window_time
            gnorm = "" if stats.grad_norm is None else f" | grad norm {stats.grad_norm:.3f}"
            memory = describe_memory(memory_stats(run.device))
            log(
                f"step {done:>6}/{c.max_steps} | loss {stats.loss:.4f} | lr {stats.lr:.3e}"
                f"{gnorm} | {rate:,.0f} tok/s" + (f" | {memory}" if memory else "")
            )
            window_time, window_steps = 0.0, 0
        if c.eval_every and done % c.eval_every == 0 and done != c.max_steps:
            loss, ppl = evaluate(
                run.model, run.data.eval_blocks, c.batch_size, c.eval_batches, c.autocast
            )
            log(f"eval @ step {done} | loss {loss:.4f} | perplexity {ppl:.2f}")
        saved = None
        if (c.save_every and done % c.save_every == 0) or done == c.max_steps:
            saved = result.last_checkpoint = save_training_state(run, done, stats.loss)
        if on_step_end is not None:
            on_step_end(done, saved)
        fault_point("train.after_step", done)
    bar.close()
    steps_run = result.final_step - run.start_step
    result.tokens_per_s = steps_run * tokens_per_step / train_time if train_time else 0.0
    # Read before evaluation and saving, which are not what the memory estimate describes.
    result.memory = memory_stats(run.device)
    if result.memory:
        result.estimated_peak_bytes = estimated_peak_bytes(run)
        estimate = result.estimated_peak_bytes
        log(
            f"GPU memory of the training steps: {describe_memory(result.memory)}; gnlorp-memory "
            "estimates "
            + (
                "(no estimate for this setup)"
                if estimate is None
                else f"{estimate / 2**30:.2f} GiB"
            )
        )
    _finish(run, result)
    result.elapsed_s = time.perf_counter() - started
    losses = f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else "n/a"
    log(
        f"done: {steps_run} steps this run, {result.final_step} in total, "
        f"{result.elapsed_s:.1f} s ({result.tokens_per_s:,.0f} tok/s training); train loss "
        f"{losses}; eval perplexity {result.eval_perplexity:.2f}; merged model in "
        f"{result.final_dir}"
    )
    return result


def _finish(run: Run, result: TrainResult) -> None:
    """Evaluate, then stream the merged model to ``output_dir/final`` (rank 0 writes).

    A sharded model (DeepSpeed, FSDP2) is evaluated as it is, on every rank, and its merged
    weights are gathered one module at a time (:mod:`gnlorp_dist.checkpoint.merged`): no whole
    second model on the host beside the engine's copy. Under DeepSpeed they are merged from the
    fp32 masters and saved in the run's ``--dtype``. The optimizer state is dropped first (the
    final checkpoint holds it): a finished run keeps none."""
    c = run.config
    sharded = run.engine is not None or c.fsdp
    if run.engine is not None:
        run.optimizer.state.clear()
        run.model.zero_grad(set_to_none=True)
    loss, ppl = evaluate(run.model, run.data.eval_blocks, c.batch_size, c.eval_batches, c.autocast)
    result.eval_loss, result.eval_perplexity = loss, ppl
    log(f"eval @ step {result.final_step} | loss {loss:.4f} | perplexity {ppl:.2f}")
    sample = run.data.eval_blocks[: min(2, run.data.eval_blocks.shape[0])]
    ours = model_logits(run.model, sample) if sharded else None  # a collective forward when sharded
    info = {
        "step": result.final_step,
        "eval_loss": loss,
        "eval_perplexity": ppl,
        "run_config": config_record(c, run.llama),
    }
    hf_logging.disable_progress_bar()
    try:
        final = save_merged_streamed(
            run.model,
            c.output_dir,
            gather=_whole_parameter(run),
            dtype=merged_dtype(c),
            device=run.device,
            merge=c.optimizer == "gradnormlorp",
            tokenizer=run.data.tokenizer,
            info=info,
            write=run.context.is_main,
        )
        if not run.context.is_main:  # every rank took part in the gathers; rank 0 wrote
            run.context.barrier()
            return
        assert final is not None
        result.final_dir = final
        if ours is None:
            result.merged_max_abs_logit_diff = merged_logit_difference(run.model, final, sample)
        else:
            result.merged_max_abs_logit_diff = reloaded_logit_difference(ours, final, sample)
    finally:
        hf_logging.enable_progress_bar()
    log(
        "merged model reloads with transformers.AutoModelForCausalLM: max |logit diff| "
        f"{result.merged_max_abs_logit_diff:.2e}"
    )
    run.context.barrier()


def _whole_parameter(run: Run) -> Callable[[torch.nn.Parameter], torch.Tensor]:
    if run.engine is not None:
        return ds_training.full_fp32_param
    # An FSDP2 parameter is a DTensor of row shards: all-gathered one at a time.
    return lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def train(
    config: RunConfig,
    *,
    on_step_end: StepCallback | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> TrainResult:
    """Run ``config`` end to end. ``on_step_end`` is a hook for tests and wrappers."""
    return run_training(prepare(config, context), on_step_end=on_step_end)


def _clips_full_gradient(run: Run) -> bool:
    """Whether the loop clips the whole gradient (torch's clip_grad_norm_) before the step;
    otherwise the optimizer clips what it consumes (or per-layer hooks clip per parameter).
    The rule is the resolved one (prepare() records it), the same at every world size; torch's
    AdamW, which consumes the full gradient, is always clipped here."""
    c = run.config
    return effective_clip_norm_of(c, run.context.world_size) == "full" or c.optimizer == "adamw"


def _clip_description(run: Run) -> str:
    c = run.config
    if not c.grad_clip:
        return "off"
    if run.per_layer is not None:
        return f"{c.grad_clip:g} per parameter (the tensor each update consumes)"
    if _clips_full_gradient(run):
        return f"{c.grad_clip:g} (global norm of the whole gradient, --clip-norm-of full)"
    return (
        f"{c.grad_clip:g} (global norm of what the optimizer consumes: each projected "
        "matrix's low-rank gradient and each dense gradient, --clip-norm-of consumed)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = config_from_namespace(parser.parse_args(argv))
    try:
        device = resolve_device(config.device)
        if device.type == "cpu":
            # DeepSpeed (also imported by transformers' save_pretrained) then takes its CPU
            # accelerator and gloo, and does not probe for a GPU.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        activate_device(device, tf32=config.tf32)
        context = init_distributed(config.world_size, device)
        set_log_rank(context.rank)
        if context.world_size > 1:
            if config.fsdp:
                mode = "fsdp2"
            else:
                reduction = effective_grad_reduction(config, context.world_size)
                mode = {"lowrank": "low-rank gradient reduction"}.get(reduction, reduction)
            log(f"distributed: {context.world_size} processes ({mode})")
        run = prepare(config, context)
    except (ValueError, ModuleNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if not context.is_main:
        run.config = dataclasses.replace(run.config, progress=False)
    try:
        run_training(run)
    except NotEnoughSpace as err:  # refused before any step, like prepare()'s mistakes
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except FloatingPointError as err:  # diverged: a clear message and exit status 1
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
