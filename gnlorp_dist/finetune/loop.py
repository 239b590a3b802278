"""The fine-tuning loop: train, evaluate, log (text and TensorBoard), then merge, save, reload
with stock ``transformers`` and compare, and write ``metrics.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from gnlorp_dist.checkpoint.merged import save_merged_model
from gnlorp_dist.device import describe_memory, memory_stats, to_device
from gnlorp_dist.finetune.build import FinetuneRun
from gnlorp_dist.finetune.data import EncodedSplit, collate
from gnlorp_dist.finetune.metrics import compute_metrics
from gnlorp_dist.finetune.models import count_parameters
from gnlorp_dist.nn import merge_weight_norm
from gnlorp_dist.nn.wegeft import merge_wegeft

RELOAD_CHECK_EXAMPLES = 64
"""Validation examples the reloaded model is compared on."""


def log(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


@dataclass(kw_only=True)
class FinetuneResult:
    metrics: dict[str, float]
    """Final validation metrics, with ``eval_loss``."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Every evaluation: ``step``, ``epoch``, ``eval_loss`` and the metrics."""
    train_losses: list[float] = field(default_factory=list)
    """Training loss of every step."""
    steps: int = 0
    elapsed_s: float = 0.0
    """Wall time of the whole run (training, evaluation, saving, reload check)."""
    train_samples_per_s: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)
    """Peak GPU memory of the training steps (:func:`gnlorp_dist.device.memory_stats`; empty
    on the CPU)."""
    merged_max_abs_logit_diff: float = math.nan
    """Trained model vs the merged model reloaded with stock transformers (its own tokenizer)."""
    reloaded_tokenizer_matches: bool = False
    """The saved tokenizer, reloaded with AutoTokenizer, gives the ids trained on."""
    reloaded_predictions_agree: float = math.nan
    """Share of the checked examples where the reloaded model predicts the same (regression:
    the same value to 1e-4)."""
    final_dir: Path | None = None
    metrics_file: Path | None = None


# ----------------------------------------------------------------------------------- helpers


def _batches(run: FinetuneRun) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled training batches, epoch after epoch (seeded: same seed, same order)."""
    generator = torch.Generator().manual_seed(run.config.seed)
    n, size = len(run.train), run.config.batch_size
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            yield collate(run.train, order[start : start + size], run.tokenizer.pad_token_id)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: to_device(v, device) for k, v in batch.items()}


def _predictions(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    return logits.squeeze(-1) if regression else logits.argmax(dim=-1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: EncodedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    regression: bool,
    metric_names: tuple[str, ...],
) -> dict[str, float]:
    """``eval_loss`` (mean over examples) and the metrics on ``split``."""
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    for start in range(0, len(split), batch_size):
        indices = list(range(start, min(start + batch_size, len(split))))
        out = model(**_to(collate(split, indices, pad_token_id), device))
        total_loss += float(out.loss) * len(indices)
        predictions.append(_predictions(out.logits.float(), regression).cpu())
    model.train(was_training)
    pred = torch.cat(predictions).numpy()
    true = split.labels.numpy()
    return {"eval_loss": total_loss / len(split), **compute_metrics(metric_names, pred, true)}


class MetricWriter:
    """TensorBoard scalars under ``<output_dir>/tensorboard`` (a no-op when off)."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (optional dep)

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format(values: dict[str, float]) -> str:
    return " | ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in values.items())


def _json_safe(value: Any) -> Any:
    """NaN and inf become null: metrics.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _describe(run: FinetuneRun) -> None:
    c, raw = run.config, run.raw
    origin = {
        "builtin": "built in, random init",
        "config": "random init",
        "local": "local weights",
        "hub": "hub weights",
    }[run.model_source]
    total, trainable = count_parameters(run.model), count_parameters(run.model, True)
    log(
        f"model {c.model_config or c.model} ({origin}, {run.model.config.model_type}): "
        f"{total:,} parameters ({trainable:,} trainable); body layers {','.join(run.targets)}"
    )
    if c.optimizer == "adamw":
        recipe = ""
    elif c.optimizer == "wegeft":
        alpha = c.wegeft_alpha if c.wegeft_alpha is not None else c.wegeft_rank
        recipe = (
            f", WeGeFT rank {c.wegeft_rank}, alpha {alpha:g}, "
            f"{'shared across layers' if c.wegeft_shared else 'per layer'}"
            + (f", dropout {c.wegeft_dropout:g}" if c.wegeft_dropout else "")
        )
    else:
        recipe = f", rank {c.rank}, T {c.update_proj_gap}, scale {c.scale:g}, {c.proj_type}"
        recipe += f", {c.bits}-bit states" if c.bits != 32 else ""
        recipe += f", LoRA rank {c.lora_rank}" if c.lora_rank else ""
    log(
        f"optimizer {c.optimizer}: lr {c.lr:g}, warmup {run.warmup_steps} then linear decay, "
        f"clip {c.grad_clip or 'off'}, weight decay {c.weight_decay:g}{recipe}"
    )
    kind = (
        "regression"
        if raw.labels.regression
        else f"{raw.labels.num_labels} classes {raw.labels.names[:10]}"
    )
    log(
        f"data {raw.description}: {len(run.train)} train / {len(run.validation)} validation "
        f"examples, text {','.join(raw.text_columns)}, {kind}; metrics {','.join(run.metric_names)}"
    )
    log(f"tokenizer {run.tokenizer_source}; max {c.max_seq_len} tokens")
    log(
        f"training {run.total_steps} steps ({run.total_steps / run.steps_per_epoch:.1f} epochs of "
        f"{run.steps_per_epoch}), batch {c.batch_size}, device {run.device}"
        + (f", {c.threads} CPU thread(s)" if run.device.type == "cpu" and c.threads else "")
        + (f", TF32 {'on' if c.tf32 else 'off'}" if run.device.type == "cuda" else "")
    )


# --------------------------------------------------------------------------------------- run


def run_finetune(run: FinetuneRun) -> FinetuneResult:
    """Train ``run`` to its last step, evaluating on schedule, then save and verify.

    ``config.threads`` applies for the duration of the call only."""
    previous_threads = torch.get_num_threads()
    if run.config.threads:
        torch.set_num_threads(run.config.threads)
    try:
        return _run(run)
    finally:
        torch.set_num_threads(previous_threads)


@dataclass(kw_only=True)
class _LogWindow:
    """The training steps since the last log line."""

    losses: list[float] = field(default_factory=list)
    """Loss of every step in the window."""
    seconds: float = 0.0
    """Wall time of those steps."""
    samples: int = 0
    """Examples in those steps."""


def _run(run: FinetuneRun) -> FinetuneResult:
    started = time.perf_counter()
    _describe(run)
    output_dir = Path(run.config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    writer = MetricWriter(output_dir / "tensorboard" if run.config.tensorboard else None)
    result = FinetuneResult(metrics={})
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        samples, train_time = _train(run, result, writer)
    finally:
        writer.close()
    result.train_samples_per_s = samples / train_time if train_time else 0.0
    # Read before the save and reload check, whose extra model copy is not training's peak.
    result.memory = memory_stats(run.device)
    _save_and_verify(run, result)
    result.elapsed_s = time.perf_counter() - started
    result.metrics_file = _write_metrics(run, result)
    first, last = result.train_losses[0], result.train_losses[-1]
    memory = f", GPU {describe_memory(result.memory)}" if result.memory else ""
    log(
        f"done: {result.steps} steps in {result.elapsed_s:.1f} s ({result.train_samples_per_s:,.0f} "
        f"samples/s training{memory}); train loss {first:.4f} -> {last:.4f}; "
        f"{_format(result.metrics)}; metrics in {result.metrics_file}"
    )
    return result


def _train(run: FinetuneRun, result: FinetuneResult, writer: MetricWriter) -> tuple[int, float]:
    """Every training step, logged every ``log_every`` steps and evaluated every
    ``eval_every`` (default: each epoch) and at the end; fills ``result``'s losses, steps,
    history and metrics. Returns the examples trained on and the wall time of the steps."""
    c = run.config
    params = [p for p in run.model.parameters() if p.requires_grad]
    batches = _batches(run)
    train_time, samples = 0.0, 0
    window = _LogWindow()
    run.model.train()
    for step in range(1, run.total_steps + 1):
        step_start = time.perf_counter()
        batch = _to(next(batches), run.device)
        lr = run.optimizer.param_groups[0]["lr"]
        loss_value, grad_norm = _train_step(run, params, batch, step)
        elapsed = time.perf_counter() - step_start
        size = int(batch["labels"].shape[0])
        train_time, window.seconds = train_time + elapsed, window.seconds + elapsed
        samples, window.samples = samples + size, window.samples + size
        result.train_losses.append(loss_value)
        window.losses.append(loss_value)
        result.steps = step
        if step % c.log_every == 0 or step == run.total_steps:
            _log_window(run, writer, window, step=step, lr=lr, grad_norm=grad_norm)
            window = _LogWindow()
        every = c.eval_every or run.steps_per_epoch
        if step % every == 0 or step == run.total_steps:
            _evaluate_at(run, result, writer, step)
    return samples, train_time


def _train_step(
    run: FinetuneRun, params: list[nn.Parameter], batch: dict[str, torch.Tensor], step: int
) -> tuple[float, float | None]:
    """One optimizer step on ``batch``; returns the loss and, when clipping, the gradient norm
    before clipping."""
    loss = run.model(**batch).loss
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss is {loss_value} at step {step}; lower --lr")
    loss.backward()
    grad_norm = None
    if run.config.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, run.config.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return loss_value, grad_norm


def _log_window(
    run: FinetuneRun,
    writer: MetricWriter,
    window: _LogWindow,
    *,
    step: int,
    lr: float,
    grad_norm: float | None,
) -> None:
    """The log line (and TensorBoard scalars) of the steps in ``window``."""
    mean_loss = sum(window.losses) / len(window.losses)
    gnorm = "" if grad_norm is None else f" | grad norm {grad_norm:.3f}"
    memory = describe_memory(memory_stats(run.device))
    log(
        f"step {step:>5}/{run.total_steps} | epoch {step / run.steps_per_epoch:5.2f} "
        f"| loss {mean_loss:.4f} | lr {lr:.3e}{gnorm} | "
        f"{window.samples / window.seconds:,.0f} samples/s" + (f" | {memory}" if memory else "")
    )
    stats = {"loss": mean_loss, "lr": lr}
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    writer.scalars("train", stats, step)


def _evaluate_at(run: FinetuneRun, result: FinetuneResult, writer: MetricWriter, step: int) -> None:
    """Evaluate on the validation split; the metrics join ``result``'s history and become its
    current metrics."""
    metrics = evaluate(
        run.model,
        run.validation,
        batch_size=2 * run.config.batch_size,
        pad_token_id=run.tokenizer.pad_token_id,
        device=run.device,
        regression=run.raw.labels.regression,
        metric_names=run.metric_names,
    )
    epoch = step / run.steps_per_epoch
    result.history.append({"step": step, "epoch": epoch, **metrics})
    log(f"eval @ step {step} (epoch {epoch:.2f}) | {_format(metrics)}")
    writer.scalars("eval", metrics, step)
    result.metrics = metrics


@torch.no_grad()
def _save_and_verify(run: FinetuneRun, result: FinetuneResult) -> None:
    """Merge (weight norm, LoRA adapters and WeGeFT updates fold into plain nn.Linear), save
    model + tokenizer, reload both with the Auto classes and compare on validation examples."""
    c = run.config
    merge = {"gradnormlorp": merge_weight_norm, "wegeft": merge_wegeft}.get(c.optimizer)
    hf_logging.disable_progress_bar()
    try:
        final = save_merged_model(run.model, c.output_dir, merge=merge, tokenizer=run.tokenizer)
        reloaded = AutoModelForSequenceClassification.from_pretrained(
            str(final), local_files_only=True
        ).to(run.device)
        reloaded_tokenizer = AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    finally:
        hf_logging.enable_progress_bar()
    result.final_dir = final
    count = min(RELOAD_CHECK_EXAMPLES, len(run.validation))
    ours = collate(run.validation, list(range(count)), run.tokenizer.pad_token_id)
    ours.pop("labels")
    texts = run.validation.texts[:count]
    second = [t[1] for t in texts] if len(texts[0]) == 2 else None
    theirs = reloaded_tokenizer(
        [t[0] for t in texts],
        second,
        truncation=True,
        max_length=c.max_seq_len,
        padding=True,
        return_tensors="pt",
    )
    result.reloaded_tokenizer_matches = torch.equal(theirs["input_ids"], ours["input_ids"])
    was_training = run.model.training
    run.model.eval()
    reloaded.eval()
    logits = run.model(**_to(ours, run.device)).logits.float()
    reloaded_logits = reloaded(**_to(dict(theirs), run.device)).logits.float()
    run.model.train(was_training)
    if logits.shape != reloaded_logits.shape:
        result.merged_max_abs_logit_diff = math.inf
        result.reloaded_predictions_agree = 0.0
    else:
        result.merged_max_abs_logit_diff = float((logits - reloaded_logits).abs().max())
        regression = run.raw.labels.regression
        a, b = _predictions(logits, regression), _predictions(reloaded_logits, regression)
        same = (a - b).abs() <= 1e-4 if regression else a == b
        result.reloaded_predictions_agree = float(same.float().mean())
    tokenizer_note = "same ids" if result.reloaded_tokenizer_matches else "DIFFERENT ids"
    log(
        f"merged model saved to {final}; AutoModelForSequenceClassification + AutoTokenizer "
        f"reload it ({tokenizer_note}): max |logit diff| {result.merged_max_abs_logit_diff:.2e} "
        f"on {count} validation examples, predictions agree on "
        f"{result.reloaded_predictions_agree:.0%}"
    )


def _write_metrics(run: FinetuneRun, result: FinetuneResult) -> Path:
    """``<output_dir>/metrics.json`` (and a copy inside the model folder)."""
    losses = result.train_losses
    record = {
        "metrics": result.metrics,
        "history": result.history,
        "steps": result.steps,
        "epochs": result.steps / run.steps_per_epoch,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "train_loss_last_epoch_mean": float(np.mean(losses[-run.steps_per_epoch :])),
        "elapsed_s": result.elapsed_s,
        "train_samples_per_s": result.train_samples_per_s,
        **({"device": str(run.device), "gpu_memory": result.memory} if result.memory else {}),
        "merged_max_abs_logit_diff": result.merged_max_abs_logit_diff,
        "reloaded_tokenizer_matches": result.reloaded_tokenizer_matches,
        "reloaded_predictions_agree": result.reloaded_predictions_agree,
        "final_dir": result.final_dir,
        "model_source": run.model_source,
        "parameters": count_parameters(run.model),
        "trainable_parameters": count_parameters(run.model, True),
        "label_names": run.raw.labels.names,
        "metric_names": list(run.metric_names),
        "config": dataclasses.asdict(run.config),
    }
    text = json.dumps(_json_safe(record), indent=2, allow_nan=False) + "\n"
    path = Path(run.config.output_dir) / "metrics.json"
    path.write_text(text)
    if result.final_dir is not None:
        (result.final_dir / "gnlorp_finetune.json").write_text(text)
    return path
