"""The comparison and the sweeps behind ``gnlorp-bench``: build, train, measure, report."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.bench import plots
from gnlorp_dist.bench.config import GRANULAR_METHODS, BenchConfig, hyper, resolve
from gnlorp_dist.bench.harness import environment, write_json
from gnlorp_dist.bench.logs import RunLogger, tensorboard_writer_class
from gnlorp_dist.bench.methods import missing_dependency
from gnlorp_dist.bench.report import comparison_table, max_relative_difference, sweep_table
from gnlorp_dist.bench.runner import (
    MethodRun,
    measure_cuda_memory,
    measure_memory,
    start_run,
    summarize,
    train_interleaved,
)
from gnlorp_dist.data.loader import TrainData, build_data
from gnlorp_dist.device import activate_device, to_device
from gnlorp_dist.models import build_model_on_meta, count_parameters

_SWEEP_KEYS = {"rank": "rank", "gap": "update_proj_gap", "granularity": "granularity"}
_SWEEP_LABELS = {
    "rank": "projection rank r",
    "gap": "subspace refresh gap T (steps)",
    "granularity": "granularity c (rank r = {budget} / c: c * r fixed)",
}


def _check_dependencies(methods: tuple[str, ...], tensorboard: bool) -> None:
    for method in methods:
        package = missing_dependency(method)
        if package is not None:
            raise ModuleNotFoundError(
                f"method {method!r} needs the package {package!r}, which is not importable: "
                f"pip install {package}, or leave {method} out of --methods",
                name=package,
            )
    if tensorboard:
        tensorboard_writer_class()


def _data(config: BenchConfig) -> tuple[TrainData, list[Tensor], Tensor]:
    """The data, the batches of every step and the held-out blocks, on the run's device."""
    data = build_data(
        data=config.data,
        tokenizer=config.tokenizer,
        seq_len=config.seq_len,
        global_batch=config.batch_size,
        seed=config.seed,
    )
    device = torch.device(config.device)
    # Drawn once: every method trains on exactly these batches, in this order. Moved to the
    # device up front, so no step's time includes a host-to-device copy.
    batches = [to_device(data.train.next_batch(), device) for _ in range(config.steps)]
    return data, batches, to_device(data.eval_blocks, device)


def _logger(config: BenchConfig, stem: str) -> RunLogger:
    out = Path(config.output_dir)
    tensorboard_dir = out / "tensorboard" / stem if config.tensorboard else None
    return RunLogger(out / f"{stem}.log", config.log_every, tensorboard_dir)


def _settings(config: BenchConfig, llama: Any, data: TrainData) -> dict[str, Any]:
    settings = {
        **dataclasses.asdict(config),
        "num_parameters": count_parameters(build_model_on_meta(llama)),
        "data_description": data.description,
        "tokens_per_step": config.batch_size * config.seq_len,
    }
    if _on_cuda(config):
        settings["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
    return settings


def _on_cuda(config: BenchConfig) -> bool:
    return torch.device(config.device).type == "cuda"


def _start(config: BenchConfig, llama: Any, label: str, method: str, **override: int) -> MethodRun:
    return start_run(
        label,
        method,
        llama,
        hyper(config, **override),
        seed=config.seed,
        warmup_steps=int(config.warmup_steps or 0),
        steps=config.steps,
        min_lr_ratio=config.min_lr_ratio,
        device=config.device,
    )


def _header(config: BenchConfig, llama: Any, data: TrainData, logger: RunLogger) -> None:
    hp = hyper(config)
    logger.line(
        f"gnlorp-bench: {config.model_config or config.model} "
        f"({count_parameters(build_model_on_meta(llama)):,} parameters), {config.steps} steps of "
        f"{config.batch_size} x {config.seq_len} tokens, seed {config.seed}, "
        f"{torch.get_num_threads()} threads"
        + (
            f", on {config.device} ({torch.cuda.get_device_name(config.device)})"
            if _on_cuda(config)
            else ""
        )
    )
    logger.line(f"data: {data.description}")
    logger.line(
        f"projected methods: lr {hp.lr:g}, rank {hp.rank}, T {hp.update_proj_gap}, "
        f"scale {hp.scale}, {hp.proj_type}; adamw/adamw8bit/lora/dora/wegeft: lr "
        f"{hp.adamw_lr:g}; lora/dora/wegeft rank {hp.lora_rank}, alpha {hp.lora_alpha:g}; "
        f"warmup {config.warmup_steps} "
        f"+ cosine to {config.min_lr_ratio:g}x; clip {config.grad_clip or 'off'}; "
        f"weight decay {config.weight_decay:g}"
    )
    if any(
        m in GRANULAR_METHODS for m in (config.sweep_methods if config.sweep else config.methods)
    ):
        logger.line(
            f"granular methods (vlorp, vlorp-projfactor, gradnormlorp-granular): granularity "
            f"c {hp.granularity}, rank r {hp.vlorp_rank} (c * r = {hp.granularity * hp.vlorp_rank}"
            f"; a granularity sweep keeps c * r = {hp.rank})"
        )


def run_comparison(config: BenchConfig, llama: Any) -> dict[str, Any]:
    """Train every method of ``config``, measure them, write table, JSON, log and plots."""
    out = Path(config.output_dir)
    started = time.perf_counter()
    data, batches, eval_blocks = _data(config)
    logger = _logger(config, "compare")
    try:
        _header(config, llama, data, logger)
        runs = [_start(config, llama, m, m) for m in config.methods]
        logger.line(f"data and {len(runs)} models ready in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        train_interleaved(runs, batches, config.grad_clip, logger)
        logger.line(f"trained {len(runs)} methods in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        results = {run.label: _evaluated(config, llama, run, batches[0], eval_blocks, logger)
                   for run in runs}  # fmt: skip
        logger.line(
            f"evaluated{' and measured memory' if config.measure_memory else ''} in "
            f"{time.perf_counter() - started:.1f} s"
        )
        payload = _comparison_payload(config, llama, data, results)
        table = comparison_table(results, config.loss_window, cuda=_on_cuda(config))
        summary = _comparison_notes(payload)
        logger.line("\n" + table + ("\n\n" + "\n".join(summary) if summary else ""))
    finally:
        logger.close()
    (out / "compare.txt").write_text(table + "\n\n" + "\n".join(summary) + "\n")
    payload["files"] = {k: str(v) for k, v in _comparison_files(config, results).items()}
    write_json(out / "compare.json", payload)
    return payload


def _evaluated(
    config: BenchConfig,
    llama: Any,
    run: MethodRun,
    batch: Tensor,
    eval_blocks: Tensor,
    logger: RunLogger,
) -> dict[str, Any]:
    """``run``'s summary (evaluated), with its memory measured on ``batch`` when asked; the
    run's model and optimizer are freed first."""
    result = summarize(run, eval_blocks, config.batch_size, config.eval_batches, config.loss_window)
    del run.setup.model, run.setup.optimizer  # free before the next memory probe
    if config.measure_memory:
        on_device = {"device": torch.device(config.device)} if _on_cuda(config) else {}
        measure = measure_cuda_memory if on_device else measure_memory
        result["memory"] = measure(
            result["method"],
            llama,
            run.hp,
            seed=config.seed,
            batch=batch,
            grad_clip=config.grad_clip,
            **on_device,
        )
    logger.final(run.label, _final_metrics(result))
    return result


def _comparison_files(config: BenchConfig, results: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """The comparison's files by name: table, JSON and log (written by the caller) and the
    plots (written here)."""
    out = Path(config.output_dir)
    title = f"{config.model_config or config.model}, {config.steps} steps, seed {config.seed}"
    files = {
        "table": out / "compare.txt",
        "json": out / "compare.json",
        "log": out / "compare.log",
        "loss_vs_step": plots.loss_curves(
            results, f"Train loss: {title}", out / "loss_vs_step.png", wall_time=False
        ),
        "loss_vs_time": plots.loss_curves(
            results, f"Train loss vs time: {title}", out / "loss_vs_time.png", wall_time=True
        ),
    }
    if config.measure_memory and _on_cuda(config):
        files["memory"] = plots.cuda_memory_bars(
            results, f"Peak GPU memory ({config.device}): {title}", out / "memory.png"
        )
    elif config.measure_memory:
        files["memory"] = plots.memory_bars(
            results, f"Peak live memory of one step: {title}", out / "memory.png"
        )
    return files


def _final_metrics(result: dict[str, Any]) -> dict[str, float]:
    memory = result.get("memory") or {}
    return {
        "train_loss": result["final_train_loss"],
        "eval_perplexity": result["eval_perplexity"],
        "optimizer_state_MiB": result["optimizer_state_bytes"] / 2**20,
        "peak_memory_MiB": memory.get("peak_bytes", float("nan")) / 2**20,
    }


def _comparison_payload(
    config: BenchConfig, llama: Any, data: TrainData, results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    base = results.get("adamw")
    for result in results.values():
        if base is not None:
            result["time_ratio_to_adamw"] = (
                result["step_time"]["mean_s"] / base["step_time"]["mean_s"]
            )
    if _on_cuda(config):
        _add_gpu_ratios(results, config.batch_size * config.seq_len)
    checks: dict[str, Any] = {}
    if "galore" in results and "galore-torch" in results:
        checks["galore_vs_galore_torch_max_rel_loss_diff"] = max_relative_difference(
            results["galore"]["losses"], results["galore-torch"]["losses"]
        )
    if "galore" in results and "gradnormlorp" in results:
        ours, theirs = results["gradnormlorp"]["losses"], results["galore"]["losses"]
        pairs = list(zip(ours, theirs))
        checks["gradnormlorp_vs_galore"] = {
            "final_train_loss_diff": results["gradnormlorp"]["final_train_loss"]
            - results["galore"]["final_train_loss"],
            "eval_perplexity": [
                results["gradnormlorp"]["eval_perplexity"],
                results["galore"]["eval_perplexity"],
            ],
            "fraction_of_steps_at_or_below": sum(a <= b for a, b in pairs) / max(1, len(pairs)),
        }
    return {
        "benchmark": "gnlorp-bench compare",
        "environment": environment(),
        "settings": _settings(config, llama, data),
        "checks": checks,
        "methods": results,
    }


def _add_gpu_ratios(results: dict[str, dict[str, Any]], tokens_per_step: int) -> None:
    """Tokens/s (mean step time, first step excluded) and peak GPU memory of every method, and
    both as ratios to adamw's in the same run (absent without an adamw row)."""
    for result in results.values():
        result["tokens_per_s"] = tokens_per_step / result["step_time"]["mean_s"]
    base = results.get("adamw")
    if base is None:
        return
    for result in results.values():
        result["tokens_per_s_ratio_to_adamw"] = result["tokens_per_s"] / base["tokens_per_s"]
        memory, base_memory = result.get("memory"), base.get("memory")
        if memory and base_memory:
            result["peak_memory_ratio_to_adamw"] = memory["peak_bytes"] / base_memory["peak_bytes"]


def _comparison_notes(payload: dict[str, Any]) -> list[str]:
    checks, notes = payload["checks"], []
    diff = checks.get("galore_vs_galore_torch_max_rel_loss_diff")
    if diff is not None:
        notes.append(
            f"galore vs galore-torch: max relative difference of the loss curves {diff:.3e}"
        )
    versus = checks.get("gradnormlorp_vs_galore")
    if versus is not None:
        ours, theirs = versus["eval_perplexity"]
        relation = "at or below" if versus["final_train_loss_diff"] <= 0 else "above"
        notes.append(
            f"gradnormlorp vs galore: final train loss {relation} galore's by "
            f"{abs(versus['final_train_loss_diff']):.4f}; at or below galore's on "
            f"{versus['fraction_of_steps_at_or_below']:.0%} of the steps; eval perplexity "
            f"{ours:.2f} vs {theirs:.2f}"
        )
    return notes


def run_sweep(config: BenchConfig, llama: Any) -> dict[str, Any]:
    """Final loss of the sweep's methods at every value of the swept rank or gap."""
    assert config.sweep is not None and config.sweep_values is not None
    out, name = Path(config.output_dir), config.sweep
    stem = f"sweep_{name}"
    data, batches, eval_blocks = _data(config)
    logger = _logger(config, stem)
    try:
        _header(config, llama, data, logger)
        runs, values = [], {}
        for value in config.sweep_values:
            for method in config.sweep_methods:
                label = f"{method} {name}={value}"
                run = _start(config, llama, label, method, **{_SWEEP_KEYS[name]: value})
                runs.append(run)
                values[label] = value
        logger.line(f"sweep over {name}: {', '.join(map(str, config.sweep_values))}")
        train_interleaved(runs, batches, config.grad_clip, logger)
        results = {}
        for run in runs:
            result = summarize(
                run, eval_blocks, config.batch_size, config.eval_batches, config.loss_window
            )
            result["sweep_value"] = values[run.label]
            if result["method"] in GRANULAR_METHODS:
                result["granularity"] = run.hp.granularity
                result["vlorp_rank"] = run.hp.vlorp_rank
            results[run.label] = result
            logger.final(run.label, _final_metrics(result))
        table = sweep_table(results, name, config.loss_window)
        logger.line("\n" + table)
    finally:
        logger.close()
    points: dict[str, list[tuple[int, float]]] = {m: [] for m in config.sweep_methods}
    for result in results.values():
        points[result["method"]].append((result["sweep_value"], result["final_train_loss"]))
    title = (
        f"Final train loss vs {name}: {config.model_config or config.model}, {config.steps} steps"
    )
    setting = _SWEEP_LABELS[name].format(budget=config.rank)
    plot = plots.sweep_plot(points, setting, title, out / f"{stem}.png")
    (out / f"{stem}.txt").write_text(table + "\n")
    payload = {
        "benchmark": f"gnlorp-bench sweep {name}",
        "environment": environment(),
        "settings": _settings(config, llama, data),
        "points": {m: sorted(p) for m, p in points.items()},
        "methods": results,
        "files": {
            "table": str(out / f"{stem}.txt"),
            "json": str(out / f"{stem}.json"),
            "log": str(out / f"{stem}.log"),
            "plot": str(plot),
        },
    }
    write_json(out / f"{stem}.json", payload)
    return payload


def run(config: BenchConfig) -> dict[str, Any]:
    """Validate ``config`` (ValueError naming any bad value), then compare or sweep. The torch
    thread count is set for the run and restored afterwards."""
    config, llama, _ = resolve(config)
    _check_dependencies(
        config.sweep_methods if config.sweep else config.methods, config.tensorboard
    )
    activate_device(torch.device(config.device))  # before the first allocation on a GPU
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        if config.sweep:
            return run_sweep(config, llama)
        return run_comparison(config, llama)
    finally:
        torch.set_num_threads(threads)
