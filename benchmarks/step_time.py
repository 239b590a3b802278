"""Training-step time of galore, gradnormlorp and galore-torch as a ratio to torch.optim.AdamW.

Every method trains its own copy of the same small model (same seed, same weights) on the same
random-token batches in ONE process; the methods take turns step by step (the order rotating),
so drift in the machine's speed hits all of them alike. Warm-up steps are dropped. Subspace
refreshes happen only at the steps ``k`` with ``k % refresh_gap == 0``; those steps are timed
apart from the others, and the ratio to AdamW is taken over the steps where no method refreshes.
Then, on the gradients of one backward pass, the pure SVD cost of a refresh
(``compute_projection`` summed over the model's projected matrices) is timed for the full SVD and
the randomized range finder, with the randomized one's subspace error.

    python -m benchmarks.step_time                       # llama_nano, fp32, all threads
    python -m benchmarks.step_time --model llama_micro --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import time
from typing import Any

import torch

from gnlorp_dist.bench.harness import (
    DTYPES,
    add_output_args,
    environment,
    format_table,
    median_mean,
    write_json,
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

NAME = "step_time"
RSVD_SUFFIX = "+rsvd"
"""``gradnormlorp+rsvd``: gradnormlorp whose refreshes use the randomized range finder."""
STEP_METHODS = (*REFERENCE_METHODS, f"gradnormlorp{RSVD_SUFFIX}")
NUM_BATCHES = 4
QUICK = {"steps": 4, "warmup": 1, "refresh_gap": 2, "seq_len": 16, "batch_size": 1, "repeats": 1}


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    config = llama_config(args.model)
    spec = dataclasses.replace(model_spec(args.model), update_proj_gap=args.refresh_gap)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        for _ in range(NUM_BATCHES)
    ]
    runners = [build_runner(m, config, spec, dtype, args.seed) for m in args.methods]
    gc.collect()
    for index in range(args.warmup + args.steps):
        shift = index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.step(index, batches[index % NUM_BATCHES])

    results = {r.method: summarize(r, args.warmup, args.refresh_gap) for r in runners}
    base = results.get("adamw")
    spec_gap = model_spec(args.model).update_proj_gap
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

    # Pure SVD cost on the gradients of one backward pass of the weight-normalised model.
    svd_runner = next((r for r in runners if r.method == "gradnormlorp"), None)
    if svd_runner is None:
        svd_runner = build_runner("gradnormlorp", config, spec, dtype, args.seed)
    model = svd_runner.model
    model(input_ids=batches[0], labels=batches[0]).loss.backward()
    groups = param_groups(model, "gradnormlorp", spec_hyper(spec))
    projections = time_projections(groups, spec.rank, args.repeats)
    model.zero_grad(set_to_none=True)

    return {
        "benchmark": NAME,
        "environment": environment(),
        "settings": {
            "model": args.model,
            "dtype": args.dtype,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "refresh_gap": args.refresh_gap,
            "spec_update_proj_gap": spec_gap,
            "rank": spec.rank,
            "scale": spec.scale,
            "threads": torch.get_num_threads(),
            "data": f"{NUM_BATCHES} random-token batches (seed {args.seed}), cycled",
            "num_parameters": sum(p.numel() for p in build_model_on_meta(config).parameters()),
        },
        "methods": results,
        "projection": projections,
    }


def tables(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    ms = 1e3
    rows = []
    for method, r in payload["methods"].items():
        refresh = r.get("refresh_step_s")
        rows.append(
            [
                method,
                f"{r['step_s']['median'] * ms:.1f}",
                f"{r['step_s']['mean'] * ms:.1f}",
                f"{r.get('step_ratio_to_adamw', float('nan')):.3f}",
                f"{r['optimizer_step_s']['median'] * ms:.2f}",
                f"{r.get('optimizer_step_ratio_to_adamw', float('nan')):.2f}",
                "-" if refresh is None else f"{refresh['median'] * ms:.1f}",
                "-"
                if "refresh_overhead_s" not in r
                else f"{r['refresh_overhead_s']['median'] * ms:.1f}",
                "-"
                if "amortized_ratio_to_adamw" not in r
                else f"{r['amortized_ratio_to_adamw']:.3f}",
            ]
        )
    steps = format_table(
        [
            "method",
            "step ms",
            "mean ms",
            "x adamw",
            "opt.step ms",
            "x adamw",
            "refresh ms",
            "+refresh ms",
            f"x adamw @T={s['spec_update_proj_gap']}",
        ],
        rows,
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_nano", choices=known_model_names())
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(STEP_METHODS),
        choices=STEP_METHODS,
        help="methods to time (default: all; adamw is the baseline of the ratios)",
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=list(DTYPES),
        help="weight dtype (default fp32: CPUs without native bf16 emulate it slowly)",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument(
        "--refresh-gap",
        type=int,
        default=5,
        help="update_proj_gap: steps k with k %% gap == 0 refresh and are timed apart",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the SVD timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"smoke-test sizes: {QUICK}")
    add_output_args(parser, NAME)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("seq_len", "batch_size", "steps", "repeats"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)} must be >= 1")
    if args.refresh_gap < 2:
        raise ValueError(f"--refresh-gap {args.refresh_gap} must be >= 2, or every step refreshes")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} must be >= 0")
    if args.warmup + args.steps <= args.refresh_gap:
        raise ValueError(
            f"--warmup {args.warmup} + --steps {args.steps} must exceed --refresh-gap "
            f"{args.refresh_gap}, or no timed step refreshes"
        )
    if any(m.startswith("galore-torch") for m in args.methods):
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            print("galore-torch is not installed (pip install galore-torch==1.0); skipping it")
            args.methods = [m for m in args.methods if m != "galore-torch"]
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    payload = run(args)
    payload["seconds"] = round(time.perf_counter() - started, 1)
    print(tables(payload))
    path = write_json(args.json, payload)
    print(f"\nwrote {path} ({payload['seconds']} s)")
    return payload


if __name__ == "__main__":
    main()
