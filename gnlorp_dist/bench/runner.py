"""Train several methods on the same batches, step by step in turn, and measure them.

The methods take turns at every step (the order rotating), so a drift in the machine's speed
(thermal throttling, another process) hits all of them alike and the time ratios to AdamW are
taken in the same conditions. Each method sees exactly the same batches, in the same order.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaConfig

from gnlorp_dist.bench.config import Hyper
from gnlorp_dist.bench.logs import RunLogger
from gnlorp_dist.bench.methods import (
    MethodSetup,
    build_method,
    expose_projection_tensors,
    state_bytes,
    target_state_bytes,
)
from gnlorp_dist.device import memory_stats
from gnlorp_dist.memory import measure_training_step
from gnlorp_dist.training.evaluation import evaluate
from gnlorp_dist.training.run import train_step
from gnlorp_dist.training.schedule import warmup_cosine_schedule


@dataclass(kw_only=True)
class MethodRun:
    """One method (at one setting) being trained, and what it recorded."""

    label: str
    """Name in tables, plots and logs (the method, plus the swept setting in a sweep)."""
    setup: MethodSetup
    hp: Hyper
    scheduler: torch.optim.lr_scheduler.LambdaLR
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    diverged_at: int | None = None
    """First step whose loss was not finite; the method stops training there."""


def start_run(
    label: str,
    method: str,
    llama: LlamaConfig,
    hp: Hyper,
    *,
    seed: int,
    warmup_steps: int,
    steps: int,
    min_lr_ratio: float,
    device: torch.device | str = "cpu",
) -> MethodRun:
    """A fresh model and optimizer for ``method`` on ``device`` with the shared warmup + cosine
    schedule."""
    setup = build_method(method, llama, hp, seed, device)
    scheduler = warmup_cosine_schedule(setup.optimizer, warmup_steps, steps, min_lr_ratio)
    return MethodRun(label=label, setup=setup, hp=hp, scheduler=scheduler)


def train_interleaved(
    runs: list[MethodRun], batches: list[Tensor], grad_clip: float, logger: RunLogger
) -> None:
    """One optimizer step per batch for every run, the runs taking turns, the order rotating.

    On a GPU each step is timed between two synchronisations: kernels run asynchronously, and
    without them a step's time would land on whichever later call waits for the GPU."""
    total = len(batches)
    for index, batch in enumerate(batches):
        shift = index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            if run.diverged_at is not None:
                continue
            _synchronize(batch.device)
            started = time.perf_counter()
            stats = train_step(
                run.setup.model, run.setup.optimizer, run.scheduler, [batch], grad_clip
            )
            _synchronize(batch.device)
            run.step_s.append(time.perf_counter() - started)
            run.losses.append(stats.loss)
            run.lrs.append(stats.lr)
            if not math.isfinite(stats.loss):
                run.diverged_at = index + 1
                logger.line(f"{run.label}: loss {stats.loss} at step {index + 1}; stopped")
        for run in runs:
            if run.diverged_at is None:
                logger.step(run.label, index + 1, total, run.losses, run.step_s, run.lrs[-1])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def timing(step_s: list[float]) -> dict[str, float]:
    """Step-time statistics without the first step (it allocates the optimizer states).
    The mean includes the subspace refreshes at the recipe's gap: the amortised cost."""
    timed = step_s[1:] or step_s
    return {
        "mean_s": _mean(timed),
        "median_s": statistics.median(timed) if timed else math.nan,
        "total_s": sum(step_s),
    }


def summarize(
    run: MethodRun, eval_blocks: Tensor, batch_size: int, eval_batches: int, loss_window: int
) -> dict[str, Any]:
    """Final train loss (mean of the last ``loss_window`` steps), held-out perplexity, exact
    optimizer-state bytes and step times of a trained run."""
    eval_loss, perplexity = math.nan, math.nan
    if run.diverged_at is None:
        eval_loss, perplexity = evaluate(run.setup.model, eval_blocks, batch_size, eval_batches)
    states = state_bytes(run.setup.optimizer)
    return {
        "method": run.setup.method,
        "final_train_loss": _mean(run.losses[-loss_window:]),
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity,
        "optimizer_state_bytes": states["total"],
        "projection_bytes": states["projection"],
        "target_state_bytes": target_state_bytes(run.setup.model, run.setup.optimizer),
        "trainable_parameters": run.setup.trainable_parameters,
        "peak_lr": run.setup.peak_lr,
        "diverged_at": run.diverged_at,
        "step_time": timing(run.step_s),
        "losses": run.losses,
        "step_seconds": run.step_s,
        "lrs": run.lrs,
    }


def measure_memory(
    method: str, llama: LlamaConfig, hp: Hyper, *, seed: int, batch: Tensor, grad_clip: float
) -> dict[str, Any]:
    """Peak live-tensor bytes of one steady-state training step of a fresh ``method`` copy.

    One untracked step first creates the optimizer states and projections (step 0 refreshes),
    then :func:`gnlorp_dist.memory.measure_training_step` tracks the next one (no refresh unless
    the gap is 1): every tensor storage alive at each operator boundary of forward, backward and
    optimizer step, counted once (CPU kernels' internal scratch is not visible).
    """
    setup = build_method(method, llama, hp, seed)
    train_step(setup.model, setup.optimizer, _NoSchedule(), [batch], grad_clip)
    # galore-torch keeps its bases inside projector objects the tracker cannot see.
    expose_projection_tensors(setup.optimizer)
    with warnings.catch_warnings():
        # transformers warns about a deprecated attribute the accounting probes; not ours to fix.
        warnings.simplefilter("ignore", FutureWarning)
        measured = measure_training_step(
            setup.model, setup.optimizer, batch, warmup_steps=0, max_grad_norm=grad_clip
        )
    return measured.as_dict()


CUDA_PROBE_STEPS = 2
"""Steps of the GPU memory probe: step 0 creates the states and refreshes every subspace (the
SVD workspace), step 1 is a steady step; a run's peak is the larger of the two."""


def measure_cuda_memory(
    method: str,
    llama: LlamaConfig,
    hp: Hyper,
    *,
    seed: int,
    batch: Tensor,
    grad_clip: float,
    device: torch.device,
) -> dict[str, Any]:
    """Peak GPU bytes of ``method`` training: a fresh copy on ``device``, built and stepped
    :data:`CUDA_PROBE_STEPS` times after ``torch.cuda.reset_peak_memory_stats``.

    ``peak_bytes`` is ``max_memory_allocated`` minus what was allocated before the probe (other
    methods' models, the batches), so each method is charged for its own model, gradients,
    optimizer states and activations only; ``max_memory_allocated``/``max_memory_reserved`` are
    the allocator's raw figures.
    """
    gc.collect()  # the previous probe's model and optimizer, freed before the baseline
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    setup = build_method(method, llama, hp, seed, device)
    for _ in range(CUDA_PROBE_STEPS):
        train_step(setup.model, setup.optimizer, _NoSchedule(), [batch], grad_clip)
    torch.cuda.synchronize(device)
    stats = memory_stats(device)
    del setup
    return {
        "peak_bytes": stats["max_memory_allocated"] - baseline,
        "baseline_bytes": baseline,
        **stats,
        "probe_steps": CUDA_PROBE_STEPS,
    }


class _NoSchedule:
    """A scheduler stand-in for the memory probe (its lr does not change memory)."""

    def step(self) -> None:
        pass
