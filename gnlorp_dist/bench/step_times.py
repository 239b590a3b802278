"""Training-step time of galore, gradnormlorp and galore-torch as a ratio to torch.optim.AdamW,
and the cost of a subspace refresh alone (``python -m benchmarks.step_time``).

Every method trains its own copy of the same small model (same seed, same weights) on the same
random-token batches in ONE process; the methods take turns step by step (the order rotating),
so drift in the machine's speed hits all of them alike (:func:`run`). Warm-up steps are dropped;
refresh steps (``k % refresh_gap == 0``) are timed apart (:func:`summarize`). Then
:func:`time_projections` times ``compute_projection`` over the model's projected matrices for
the full SVD and the randomized range finder. :class:`StepTimeConfig` is the script's command
line; :func:`tables` the text it prints.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any

import torch

from gnlorp_dist.bench.harness import (
    DTYPES,
    RESULTS_DIR,
    environment,
    format_table,
    median_mean,
)
from gnlorp_dist.bench.methods import (
    REFERENCE_METHODS,
    make_optimizer,
    param_groups,
    prepare_model,
    spec_hyper,
)
from gnlorp_dist.models import (
    build_model,
    build_model_on_meta,
    known_model_names,
    llama_config,
    model_spec,
)
from gnlorp_dist.optim.projection import (
    SVD_METHODS,
    compute_projection,
    project,
    projection_side,
    subspace_error,
)
from gnlorp_dist.options.fields import option

NAME = "step_time"
RSVD_SUFFIX = "+rsvd"
"""``gradnormlorp+rsvd``: gradnormlorp whose refreshes use the randomized range finder."""
STEP_METHODS = (*REFERENCE_METHODS, f"gradnormlorp{RSVD_SUFFIX}")
NUM_BATCHES = 4
QUICK = {"steps": 4, "warmup": 1, "refresh_gap": 2, "seq_len": 16, "batch_size": 1, "repeats": 1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTimeConfig:
    """What to time, on which model, for how long."""

    model: str = option("llama_nano", choices=known_model_names())
    """A named LLaMA shape and recipe."""
    methods: tuple[str, ...] = option(STEP_METHODS, choices=STEP_METHODS, metavar="METHOD")
    """Methods to time (default: all; adamw is the baseline of the ratios)."""
    dtype: str = option("fp32", choices=tuple(DTYPES))
    """Weight dtype (default fp32: CPUs without native bf16 emulate it slowly)."""
    seq_len: int = 128
    """Tokens per sequence."""
    batch_size: int = 4
    """Sequences per step."""
    steps: int = 30
    """Timed steps per method."""
    warmup: int = 3
    """Untimed first steps."""
    refresh_gap: int = 5
    """update_proj_gap: steps k with k % gap == 0 refresh and are timed apart."""
    repeats: int = 3
    """Repeats of the SVD timing."""
    threads: int | None = None
    """torch threads (default: all)."""
    seed: int = 0
    """Seeds the model and the batches."""
    quick: bool = False
    """Smoke-test sizes: steps 4, warmup 1, refresh gap 2, 1 x 16 tokens, 1 repeat."""
    json: str = option(str(RESULTS_DIR / f"{NAME}.json"), metavar="PATH")
    """Where to write the results."""

    def resolved(self) -> StepTimeConfig:
        """With --quick's sizes; ValueError for sizes where nothing (or no refresh) is timed."""
        config = dataclasses.replace(self, **QUICK) if self.quick else self
        for key in ("seq_len", "batch_size", "steps", "repeats"):
            if getattr(config, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(config, key)} must be >= 1")
        if config.refresh_gap < 2:
            raise ValueError(
                f"--refresh-gap {config.refresh_gap} must be >= 2, or every step refreshes"
            )
        if config.warmup < 0:
            raise ValueError(f"--warmup {config.warmup} must be >= 0")
        if config.warmup + config.steps <= config.refresh_gap:
            raise ValueError(
                f"--warmup {config.warmup} + --steps {config.steps} must exceed --refresh-gap "
                f"{config.refresh_gap}, or no timed step refreshes"
            )
        return config


@dataclasses.dataclass
class Runner:
    """One method's model and optimizer, and the times of its steps."""

    method: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    samples: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    """``(step index, whole step seconds, optimizer.step() seconds)``."""

    def step(self, index: int, batch: torch.Tensor) -> None:
        started = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        before_step = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ended = time.perf_counter()
        assert torch.isfinite(loss), f"{self.method}: loss {loss.item()} at step {index}"
        self.samples.append((index, ended - started, ended - before_step))


def build_runner(method: str, config, spec, dtype: torch.dtype, seed: int) -> Runner:
    base = method.removesuffix(RSVD_SUFFIX)
    model = prepare_model(build_model(config, dtype=dtype, seed=seed), base)
    hp = spec_hyper(spec, lr=1e-3)
    groups = param_groups(model, base, hp)
    if method.endswith(RSVD_SUFFIX):
        groups[0]["svd_method"] = "randomized"
    return Runner(method, model, make_optimizer(base, groups, hp))


def summarize(runner: Runner, warmup: int, gap: int) -> dict[str, Any]:
    timed = {s[0]: s for s in runner.samples if s[0] >= warmup}
    plain = [s for k, s in timed.items() if k % gap != 0]
    out: dict[str, Any] = {
        "step_s": median_mean([s[1] for s in plain]),
        "optimizer_step_s": median_mean([s[2] for s in plain]),
    }
    refresh = [k for k in timed if k % gap == 0]
    if refresh and runner.method != "adamw":
        out["refresh_step_s"] = median_mean([timed[k][1] for k in refresh])
        out["refresh_optimizer_step_s"] = median_mean([timed[k][2] for k in refresh])
        # A refresh changes only optimizer.step(): its cost is that step minus the same method's
        # neighbouring plain steps, paired so that drift in the machine's speed cancels.
        extra = []
        for k in refresh:
            neighbours = [timed[j][2] for j in (k - 1, k + 1) if j in timed and j % gap != 0]
            if neighbours:
                extra.append(timed[k][2] - statistics.fmean(neighbours))
        if extra:
            out["refresh_overhead_s"] = median_mean(extra)
    return out


def _kept_energy(grad: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    return float(project(grad.double(), basis.double(), side).square().sum())


def time_projections(groups: list[dict[str, Any]], rank: int, repeats: int) -> dict[str, Any]:
    """Seconds of ``compute_projection`` summed over the projected matrices, per SVD method, and
    the randomized finder's subspace error against the full SVD's basis."""
    matrices = [
        (p.grad, projection_side(p.shape, groups[0]["proj_type"])) for p in groups[0]["params"]
    ]
    assert all(g is not None for g, _ in matrices), "every projected matrix needs a gradient"
    out: dict[str, Any] = {"num_matrices": len(matrices), "rank": rank}
    bases: dict[str, list[torch.Tensor]] = {}
    for method in SVD_METHODS:
        totals = []
        for _ in range(repeats):
            generator = torch.Generator().manual_seed(0)
            started = time.perf_counter()
            found = [
                compute_projection(g, rank, side, method=method, generator=generator)
                for g, side in matrices
            ]
            totals.append(time.perf_counter() - started)
        bases[method] = found
        out[method] = {"total_s": median_mean(totals)}
    errors = [
        subspace_error(ref, other, side)
        for ref, other, (_, side) in zip(bases["svd"], bases["randomized"], matrices)
    ]
    out["randomized"]["subspace_error"] = {"max": max(errors), "mean": statistics.fmean(errors)}
    # The spectral-norm error is 1 as soon as one direction is missed; what training feels is how
    # much of the gradient the basis keeps: ||project(G)||_F^2 relative to the exact SVD's.
    kept = [
        _kept_energy(g, other, side) / _kept_energy(g, ref, side)
        for ref, other, (g, side) in zip(bases["svd"], bases["randomized"], matrices)
    ]
    out["randomized"]["energy_kept_vs_svd"] = {"min": min(kept), "mean": statistics.fmean(kept)}
    out["randomized_speedup"] = (
        out["svd"]["total_s"]["median"] / out["randomized"]["total_s"]["median"]
    )
    return out


def _add_ratios(results: dict[str, dict[str, Any]], spec_gap: int) -> None:
    """Each method's medians over adamw's, and its step amortised at the recipe's gap."""
    base = results.get("adamw")
    for result in results.values():
        if base is not None:
            result["step_ratio_to_adamw"] = result["step_s"]["median"] / base["step_s"]["median"]
            result["optimizer_step_ratio_to_adamw"] = (
                result["optimizer_step_s"]["median"] / base["optimizer_step_s"]["median"]
            )
        if "refresh_overhead_s" in result:
            # Mean step time when one step in spec_gap refreshes (the recipe's T).
            overhead = result["refresh_overhead_s"]["median"]
            amortized = result["step_s"]["median"] + overhead / spec_gap
            result["amortized_step_s_at_spec_T"] = amortized
            if base is not None:
                result["amortized_ratio_to_adamw"] = amortized / base["step_s"]["median"]


def _settings(c: StepTimeConfig, spec, spec_gap: int, num_parameters: int) -> dict[str, Any]:
    return {
        "model": c.model,
        "dtype": c.dtype,
        "seq_len": c.seq_len,
        "batch_size": c.batch_size,
        "steps": c.steps,
        "warmup": c.warmup,
        "refresh_gap": c.refresh_gap,
        "spec_update_proj_gap": spec_gap,
        "rank": spec.rank,
        "scale": spec.scale,
        "threads": torch.get_num_threads(),
        "data": f"{NUM_BATCHES} random-token batches (seed {c.seed}), cycled",
        "num_parameters": num_parameters,
    }


def run(c: StepTimeConfig) -> dict[str, Any]:
    """Time every method of ``c`` (resolved), then the refresh alone: the JSON payload."""
    dtype = DTYPES[c.dtype]
    config = llama_config(c.model)
    spec = dataclasses.replace(model_spec(c.model), update_proj_gap=c.refresh_gap)
    generator = torch.Generator().manual_seed(c.seed)
    batches = [
        torch.randint(0, config.vocab_size, (c.batch_size, c.seq_len), generator=generator)
        for _ in range(NUM_BATCHES)
    ]
    runners = [build_runner(m, config, spec, dtype, c.seed) for m in c.methods]
    gc.collect()
    for index in range(c.warmup + c.steps):
        shift = index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.step(index, batches[index % NUM_BATCHES])
    results = {r.method: summarize(r, c.warmup, c.refresh_gap) for r in runners}
    spec_gap = model_spec(c.model).update_proj_gap
    _add_ratios(results, spec_gap)

    # Pure SVD cost on the gradients of one backward pass of the weight-normalised model.
    svd_runner = next((r for r in runners if r.method == "gradnormlorp"), None)
    if svd_runner is None:
        svd_runner = build_runner("gradnormlorp", config, spec, dtype, c.seed)
    model = svd_runner.model
    model(input_ids=batches[0], labels=batches[0]).loss.backward()
    groups = param_groups(model, "gradnormlorp", spec_hyper(spec))
    projections = time_projections(groups, spec.rank, c.repeats)
    model.zero_grad(set_to_none=True)
    num_parameters = sum(p.numel() for p in build_model_on_meta(config).parameters())
    return {
        "benchmark": NAME,
        "environment": environment(),
        "settings": _settings(c, spec, spec_gap, num_parameters),
        "methods": results,
        "projection": projections,
    }


def _step_row(method: str, r: dict[str, Any]) -> list[str]:
    ms = 1e3
    refresh = r.get("refresh_step_s")
    overhead = r.get("refresh_overhead_s")
    amortized = r.get("amortized_ratio_to_adamw")
    return [
        method,
        f"{r['step_s']['median'] * ms:.1f}",
        f"{r['step_s']['mean'] * ms:.1f}",
        f"{r.get('step_ratio_to_adamw', float('nan')):.3f}",
        f"{r['optimizer_step_s']['median'] * ms:.2f}",
        f"{r.get('optimizer_step_ratio_to_adamw', float('nan')):.2f}",
        "-" if refresh is None else f"{refresh['median'] * ms:.1f}",
        "-" if overhead is None else f"{overhead['median'] * ms:.1f}",
        "-" if amortized is None else f"{amortized:.3f}",
    ]


def tables(payload: dict[str, Any]) -> str:
    """The step table and the refresh-cost table, as the script prints them."""
    s = payload["settings"]
    ms = 1e3
    steps = format_table(
        ["method", "step ms", "mean ms", "x adamw", "opt.step ms", "x adamw", "refresh ms",
         "+refresh ms", f"x adamw @T={s['spec_update_proj_gap']}"],
        [_step_row(method, r) for method, r in payload["methods"].items()],
    )  # fmt: skip
    p = payload["projection"]
    svd_rows = []
    for method in SVD_METHODS:
        r = p[method]
        error, kept = r.get("subspace_error"), r.get("energy_kept_vs_svd")
        svd_rows.append(
            [
                method,
                f"{r['total_s']['median'] * ms:.1f}",
                f"{r['total_s']['mean'] * ms:.1f}",
                "0 (ref)" if error is None else f"{error['max']:.3f}",
                "0 (ref)" if error is None else f"{error['mean']:.3f}",
                "1 (ref)" if kept is None else f"{kept['min']:.3f}",
                "1 (ref)" if kept is None else f"{kept['mean']:.3f}",
            ]
        )
    svd = format_table(
        ["svd method", "sum ms", "mean ms", "err max", "err mean", "kept min", "kept mean"],
        svd_rows,
    )
    return (
        f"{s['model']} ({s['num_parameters']:,} params, {s['dtype']}), batch {s['batch_size']} x "
        f"{s['seq_len']} tokens, {s['threads']} threads, rank {s['rank']}; medians over "
        f"{s['steps']} steps after {s['warmup']} warm-up, refresh every {s['refresh_gap']} steps "
        "(timed apart):\n"
        f"{steps}\n\nRefresh cost alone: compute_projection summed over the "
        f"{p['num_matrices']} projected matrices (gradnormlorp's directions, rank {p['rank']}); "
        f"randomized is {p['randomized_speedup']:.2f}x faster. err = subspace_error against the SVD "
        "basis (spectral norm of the projector difference, 0..1); kept = gradient energy the "
        f"basis keeps, relative to the SVD's:\n{svd}"
    )
