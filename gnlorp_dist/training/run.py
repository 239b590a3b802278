"""``gnlorp-train``: pre-train a LLaMA model with GradNormLoRP, GaLore or AdamW.

The loop: :func:`run_training` takes a :class:`~gnlorp_dist.training.setup.Run` that
:func:`~gnlorp_dist.training.setup.prepare` built (and resumed), steps it to ``--max-steps``
(:mod:`~gnlorp_dist.training.steps`, or the engine's step in
:mod:`~gnlorp_dist.training.deepspeed_step`), logs, evaluates and checkpoints on the way, and
ends with the merged model (:mod:`~gnlorp_dist.training.final_model`). ``train(config)`` is the
programmatic entry point, ``main(argv)`` the command line (``gnlorp-train``, ``python -m
gnlorp_dist.train``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gnlorp_dist.checkpoint.dcp import save_dcp_training_checkpoint
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
from gnlorp_dist.optim.adamw import GradNormLoRPAdamW
from gnlorp_dist.training import deepspeed_step
from gnlorp_dist.training.clip_rule import clips_full_gradient
from gnlorp_dist.training.config import (
    RunConfig,
    build_parser,
    config_from_namespace,
    config_record,
    effective_grad_reduction,
)
from gnlorp_dist.training.endings import (
    NonFiniteStepError,
    exit_for,
    nonfinite_step_error,
    too_many_skips_error,
)
from gnlorp_dist.training.evaluation import evaluate
from gnlorp_dist.training.faults import fault_point
from gnlorp_dist.training.final_model import save_final_model
from gnlorp_dist.training.preemption import (
    EXIT_PREEMPTED,
    Preempted,
    StopSignals,
    StopVote,
    stop_message,
    stop_signals,
)
from gnlorp_dist.training.report import describe_run, estimated_peak_bytes, log_memory
from gnlorp_dist.training.setup import (
    Run,
    build_optimizer,
    build_train_data,
    build_training_model,
    check_space_for_run,
    check_space_for_save,
    find_resume_checkpoint,
    log,
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


@dataclass(kw_only=True)
class _StepTimes:
    """Wall-clock time of the loop's training steps (evaluation and saving excluded)."""

    tokens_per_step: int
    """Tokens one optimizer step consumes, over every rank."""
    train_time: float = 0.0
    """Seconds of every step this call ran."""
    window_time: float = 0.0
    """Seconds of the steps since the last step line was logged."""
    window_steps: int = 0
    """Steps since the last step line was logged."""

    def add(self, step_time: float) -> None:
        """Count one step that took ``step_time`` seconds."""
        self.train_time += step_time
        self.window_time += step_time
        self.window_steps += 1


def save_training_state(run: Run, step: int, loss: float) -> Path:
    """Checkpoint everything needed to continue exactly after ``step``, once the output folder
    has room for it (:class:`NotEnoughSpace` otherwise, before anything is written)."""
    c = run.config
    check_space_for_save(run, step)
    if run.engine is not None:
        client_state = {
            "step": step,
            "skips_in_a_row": run.skips_in_a_row,
            "loss": loss,
            "scheduler": run.scheduler.state_dict(),
            "data_state": run.data.train.state_dict(),
            "run_config": config_record(c, run.llama),
        }
        return deepspeed_step.save(run, step, client_state)
    extra = {
        "loss": loss,
        "tokens_seen": step * c.batch_size * c.grad_accum * c.seq_len * run.context.world_size,
    }
    common: dict[str, Any] = {
        "step": step,
        "model": run.model,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "data_state": run.data.train.state_dict(),
        "run_config": config_record(c, run.llama),
        "keep": c.keep_checkpoints,
        "extra": extra,
        "skips_in_a_row": run.skips_in_a_row,
    }
    if c.fsdp:
        return save_dcp_training_checkpoint(c.output_dir, context=run.context, **common)
    return save_checkpoint(
        c.output_dir,
        rank=run.context.rank,
        world_size=run.context.world_size,
        barrier=run.context.barrier,
        **common,
    )


def _skips(engine: object, optimizer: GradNormLoRPAdamW | None) -> int:
    """Steps skipped so far for a non-finite gradient, by the engine or by our optimizer."""
    skipped = getattr(engine, "skipped_steps", 0)
    ours = optimizer.skipped_steps if optimizer is not None else 0
    return (skipped if isinstance(skipped, int) else 0) + ours


def run_training(
    run: Run, on_step_end: StepCallback | None = None, stop: StopSignals | None = None
) -> TrainResult:
    """Train from ``run.start_step`` to ``max_steps``, checkpointing, then evaluate and save the
    merged model, checking it reloads in stock transformers with the same logits. ``stop``:
    the signals that end the run early, all ranks at one step, with a checkpoint
    (:class:`Preempted`; :mod:`~gnlorp_dist.training.preemption`).

    A step with a non-finite gradient follows ``--on-nonfinite``: skip (nothing in the model or
    the optimizer changes; the step is logged and still consumes its batch and advances the
    schedule and the step count, as DeepSpeed's and AMP's skipped steps do; a FloatingPointError
    after ``--max-consecutive-skips`` in a row) or raise. A non-finite loss at a step that was
    not skipped raises a FloatingPointError, as before."""
    c = run.config
    check_space_for_run(run)  # before any step: what this run writes must fit
    optimizer = run.optimizer if isinstance(run.optimizer, GradNormLoRPAdamW) else None
    if optimizer is not None:
        # It skips; under --on-nonfinite raise the loop then stops with its own one-line error.
        optimizer.on_nonfinite = "skip"
    describe_run(run)
    result = TrainResult(final_step=run.start_step)
    times = _StepTimes(
        tokens_per_step=c.batch_size * c.grad_accum * c.seq_len * run.context.world_size
    )
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
    vote = StopVote(stop, run.context.communicator)
    for done in range(run.start_step + 1, c.max_steps + 1):
        step_start = time.perf_counter()
        stats = _take_step(run, optimizer, done)
        stopping = vote.after_step(last=done == c.max_steps)  # the step's loss read came first
        run.skips_in_a_row = _check_step(run, stats, done, run.skips_in_a_row, result.skipped_steps)
        step_time = time.perf_counter() - step_start
        times.add(step_time)
        result.losses.append(stats.loss)
        result.final_step = done
        _report_step(run, bar, times, step_time, stats, done)
        saved = _evaluate_and_save(run, result, done, stats.loss, on_step_end)
        if stopping and stop is not None and done < c.max_steps:  # the last step: finish
            bar.close()
            _stop_here(run, stop, vote, done, saved or _save_now(run, done, stats.loss))
    bar.close()
    _finish(run, result, times, started)
    return result


def _take_step(run: Run, optimizer: GradNormLoRPAdamW | None, step: int) -> StepStats:
    """The next batch, one optimizer step over its micro-batches, that step's stats; a
    non-finite step is skipped (``--on-nonfinite`` is the loop's to apply), except under
    ``--per-layer``, which updates inside backward and stops: :class:`NonFiniteStepError`."""
    c = run.config
    batch = to_device(run.data.train.next_batch(), run.device)
    micro = list(batch.view(c.grad_accum, c.batch_size, c.seq_len))
    if run.engine is not None:
        # DeepSpeed's ZeRO optimizers skip a non-finite step themselves (engine.skipped_steps,
        # fp32 and bf16 too) before calling ours; where they call it, ours skips.
        skipped_before = _skips(run.engine, optimizer)
        stats = deepspeed_step.train_step(run.engine, run.scheduler, micro)
        if _skips(run.engine, optimizer) > skipped_before:
            stats = dataclasses.replace(stats, skipped=True)
        return stats
    try:
        return train_step(
            run.forward_model,
            run.optimizer,
            run.scheduler,
            micro,
            c.grad_clip if clips_full_gradient(c, run.context.world_size) else 0.0,
            per_layer=run.per_layer is not None,
            autocast=c.autocast,
            on_nonfinite="skip",
            reduce_in_backward=c.overlap_reduction == "on",
        )
    except ValueError as err:
        if run.per_layer is None or "non-finite gradient in per-layer mode" not in str(err):
            raise
        log(f"step {step}: {err}")
        raise NonFiniteStepError(
            f"step {step}: non-finite gradient in per-layer mode (the parameters are listed in "
            "the log): this step's updates were applied with the non-finite entries as zero. "
            "Resume from the last checkpoint with a lower learning rate (--override lr=VALUE) "
            "or --grad-clip, or check the data"
        ) from None


def _check_step(
    run: Run, stats: StepStats, done: int, in_a_row: int, skipped_steps: list[int]
) -> int:
    """The steps skipped in a row once step ``done`` is counted (``in_a_row`` before it).

    A skipped step is logged and appended to ``skipped_steps``. Under ``--on-nonfinite raise``
    it stops the run (:class:`NonFiniteStepError`); a FloatingPointError after
    ``--max-consecutive-skips`` in a row, or for a non-finite loss at a step that was not
    skipped."""
    c = run.config
    if stats.skipped and c.on_nonfinite == "raise":
        raise nonfinite_step_error(run, done)
    if not stats.skipped:
        if not math.isfinite(stats.loss):
            raise FloatingPointError(f"loss is {stats.loss} at step {done}; lower --lr")
        return 0
    in_a_row += 1
    skipped_steps.append(done)
    log(
        f"step {done} skipped: non-finite gradient ({in_a_row} in a row, "
        f"{len(skipped_steps)} in total)"
    )
    if in_a_row >= c.max_consecutive_skips:
        raise too_many_skips_error(done, in_a_row, stats.lr)
    return in_a_row


def _report_step(
    run: Run, bar: tqdm, times: _StepTimes, step_time: float, stats: StepStats, done: int
) -> None:
    """Advance the progress bar; every ``--log-every`` steps (and at the last) log a step line
    with the throughput since the previous one."""
    c = run.config
    bar.update(1)
    rate = times.tokens_per_step / step_time
    bar.set_postfix_str(f"loss {stats.loss:.4f}, lr {stats.lr:.2e}, {rate:,.0f} tok/s")
    if done % c.log_every == 0 or done == c.max_steps:
        rate = times.window_steps * times.tokens_per_step / times.window_time
        gnorm = "" if stats.grad_norm is None else f" | grad norm {stats.grad_norm:.3f}"
        memory = describe_memory(memory_stats(run.device))
        log(
            f"step {done:>6}/{c.max_steps} | loss {stats.loss:.4f} | lr {stats.lr:.3e}"
            f"{gnorm} | {rate:,.0f} tok/s" + (f" | {memory}" if memory else "")
        )
        times.window_time, times.window_steps = 0.0, 0


def _evaluate_and_save(
    run: Run, result: TrainResult, done: int, loss: float, on_step_end: StepCallback | None
) -> Path | None:
    """After step ``done``: evaluate every ``--eval-every`` steps (the last step's evaluation is
    the final one), checkpoint every ``--save-every`` steps and at the last (the folder, or
    None), call the hook, then pass the ``train.after_step`` fault point."""
    c = run.config
    if c.eval_every and done % c.eval_every == 0 and done != c.max_steps:
        settle_directions(run)
        eval_loss, ppl = evaluate(
            run.model, run.data.eval_blocks, c.batch_size, c.eval_batches, c.autocast
        )
        log(f"eval @ step {done} | loss {eval_loss:.4f} | perplexity {ppl:.2f}")
    saved = None
    if (c.save_every and done % c.save_every == 0) or done == c.max_steps:
        settle_directions(run)
        saved = result.last_checkpoint = save_training_state(run, done, loss)
    if on_step_end is not None:
        on_step_end(done, saved)
    fault_point("train.after_step", done)
    return saved


def _save_now(run: Run, done: int, loss: float) -> Path:
    """The checkpoint of step ``done`` that ``--save-every`` did not write."""
    settle_directions(run)
    return save_training_state(run, done, loss)


def _stop_here(run: Run, stop: StopSignals, vote: StopVote, done: int, saved: Path) -> None:
    """Every rank has ``saved`` step ``done``: wait for all (no rank exits mid-save), raise."""
    stop.stopping = True
    run.context.barrier()
    log(stop_message(stop, vote, run.context.world_size, done) + f"; checkpoint {saved}")
    raise Preempted(
        f"stopped by a signal after step {done}; checkpoint {saved} written (manifest "
        f"verified on resume); run the same command to resume (exit {EXIT_PREEMPTED})",
        step=done,
        checkpoint=saved,
    )


def settle_directions(run: Run) -> None:
    """Apply what the last step left for the next forward (``--overlap-directions on``) before
    anything reads the weights."""
    pending = getattr(run.optimizer, "pending_directions", None)
    if pending is not None:
        pending.settle()


def _finish(run: Run, result: TrainResult, times: _StepTimes, started: float) -> None:
    """After the last step: throughput, the steps' GPU memory beside its estimate, the final
    evaluation and merged model (:func:`save_final_model`), and the run's summary line."""
    steps_run = result.final_step - run.start_step
    result.tokens_per_s = (
        steps_run * times.tokens_per_step / times.train_time if times.train_time else 0.0
    )
    # Read before evaluation and saving, which are not what the memory estimate describes.
    result.memory = memory_stats(run.device)
    if result.memory:
        result.estimated_peak_bytes = estimated_peak_bytes(run)
        log_memory(result.memory, result.estimated_peak_bytes)
    settle_directions(run)
    final = save_final_model(run, result.final_step)
    result.eval_loss, result.eval_perplexity = final.eval_loss, final.eval_perplexity
    result.final_dir = final.final_dir
    result.merged_max_abs_logit_diff = final.merged_max_abs_logit_diff
    result.elapsed_s = time.perf_counter() - started
    losses = f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else "n/a"
    log(
        f"done: {steps_run} steps this run, {result.final_step} in total, "
        f"{result.elapsed_s:.1f} s ({result.tokens_per_s:,.0f} tok/s training); train loss "
        f"{losses}; eval perplexity {result.eval_perplexity:.2f}; merged model in "
        f"{result.final_dir}"
    )


def train(
    config: RunConfig,
    *,
    on_step_end: StepCallback | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> TrainResult:
    """Run ``config`` end to end. ``on_step_end`` is a hook for tests and wrappers."""
    return run_training(prepare(config, context), on_step_end=on_step_end)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = config_from_namespace(parser.parse_args(argv))
    # From before setup: a signal during it stops the run after its first step, saved.
    with stop_signals() as stop:
        run = _start(parser, config)
        try:
            run_training(run, stop=stop)
        except Preempted as err:
            # Every rank says where it stopped: the step the ranks agreed on, in one line each.
            rank = f"rank {run.context.rank}: " if run.context.world_size > 1 else ""
            print(f"{parser.prog}: {rank}{err}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        except Exception as err:
            ending = exit_for(err)
            if ending is None:
                raise
            parser.exit(ending[0], f"{parser.prog}: error: {ending[1]}\n")
    return 0


def _start(parser: argparse.ArgumentParser, config: RunConfig) -> Run:
    """The device, the process group and the prepared (resumed) run; exit 2 on a ValueError."""
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
                mode = {"none": "ddp", "low_rank": "low-rank gradient reduction"}.get(
                    reduction, reduction
                )
            log(f"distributed: {context.world_size} processes ({mode})")
        run = prepare(config, context)
    except (ValueError, ModuleNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if not context.is_main:
        run.config = dataclasses.replace(run.config, progress=False)
    return run


if __name__ == "__main__":
    sys.exit(main())
