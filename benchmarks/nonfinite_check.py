"""Cost of GradNormLoRPAdamW's per-step non-finite check, as a ratio of the training step.

One weight-normalised model (gradnormlorp, fp32, CPU) and one optimizer train on random-token
batches in ONE process; the check runs on alternate steps only, so both arms share the model, the
batches and any drift in the machine's speed. The other steps skip it through the public API: a
caller that knows the gradients are finite says so (``optimizer.mark_gradients_finite()``, what
the trainer does after a finite ``clip_grad_norm_``), and one process then runs no check and no
host sync; with no refresh due that is the behaviour before the policy (a check at refresh steps
only).
The check never changes the numbers, so the two arms train the same run. No refresh happens in
the timed steps (``update_proj_gap`` above the step count) and clipping is off (with clipping
on, one process reuses the clip norm and the check costs nothing). Reported, in the same run:

- the median whole step (forward, backward, ``optimizer.step()``) with and without the check,
  and their ratio;
- the median ``optimizer.step()`` with and without it;
- the median over consecutive (check, no-check) step pairs of their ratio, and the ratio of
  the two arms' fastest steps (on a shared machine the medians carry other jobs' load);
- the check alone (the fused count over every gradient + its ``.item()``), timed on the live
  gradients after each step, and its share of the fastest step: the precise and conservative
  figure, since the step's own noise is larger than the check.

    python -m benchmarks.nonfinite_check                  # llama_60m, 12 steps per arm
    python -m benchmarks.nonfinite_check --model llama_nano --steps 4
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from gnlorp_dist import GradNormLoRPAdamW, projected_param_groups
from gnlorp_dist.bench.harness import (
    RESULTS_DIR,
    environment,
    format_table,
    median_mean,
    write_json,
)
from gnlorp_dist.bench.methods import prepare_model
from gnlorp_dist.models import build_model, llama_config, model_spec
from gnlorp_dist.optim.comm import non_finite_count
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

NAME = "nonfinite_check"


def run(model_name: str, steps: int, warmup: int, seq_len: int, seed: int) -> dict[str, Any]:
    config = llama_config(model_name)
    spec = model_spec(model_name)
    model = prepare_model(build_model(config, dtype=torch.float32, seed=seed), "gradnormlorp")
    # No refresh in the timed steps: the no-check arm then checks nothing at all.
    total_steps = warmup + 2 * steps
    groups = projected_param_groups(
        model, rank=spec.rank, update_proj_gap=total_steps + 1, scale=spec.scale
    )
    optimizer = GradNormLoRPAdamW(groups, lr=1e-3, eps=1e-6)
    gen = torch.Generator().manual_seed(seed)
    arms: dict[str, dict[str, list[float]]] = {
        arm: {"step_s": [], "optimizer_step_s": []} for arm in ("check", "no_check")
    }
    check_alone: list[float] = []
    for index in range(total_steps):
        batch = torch.randint(0, config.vocab_size, (1, seq_len), generator=gen)
        arm = "check" if index % 2 == 0 else "no_check"
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        before_step = time.perf_counter()
        if arm == "no_check":
            optimizer.mark_gradients_finite()  # this step runs no check (and no host sync)
        optimizer.step()
        ended = time.perf_counter()
        assert torch.isfinite(loss) and not optimizer.last_step_skipped
        if index >= warmup:
            arms[arm]["step_s"].append(ended - started)
            arms[arm]["optimizer_step_s"].append(ended - before_step)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            check_started = time.perf_counter()
            non_finite_count(grads).item()
            check_alone.append(time.perf_counter() - check_started)
        optimizer.zero_grad(set_to_none=True)
    step_with = statistics.median(arms["check"]["step_s"])
    step_without = statistics.median(arms["no_check"]["step_s"])
    check_s = statistics.median(check_alone)
    fastest = min(arms["check"]["step_s"] + arms["no_check"]["step_s"])
    pairs = [a / b for a, b in zip(arms["check"]["step_s"], arms["no_check"]["step_s"])]
    return {
        "model": model_name,
        "tokens_per_step": seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "timed_steps_per_arm": steps,
        "warmup_steps": warmup,
        "check": {k: median_mean(v) for k, v in arms["check"].items()},
        "no_check": {k: median_mean(v) for k, v in arms["no_check"].items()},
        "check_alone_s": median_mean(check_alone),
        "step_ratio_check_over_no_check": step_with / step_without,
        "pair_ratio_median": statistics.median(pairs),
        "fastest_step_ratio": min(arms["check"]["step_s"]) / min(arms["no_check"]["step_s"]),
        "check_share_of_fastest_step": check_s / fastest,
    }


@dataclass(frozen=True, kw_only=True)
class NonfiniteCheckConfig:
    """The model and how many steps each arm (check, no check) is timed over."""

    model: str = option("llama_60m", metavar="NAME")
    """A named LLaMA shape and recipe (llama_nano, llama_micro, llama_60m ...)."""
    steps: int = 12
    """Timed steps per arm."""
    warmup: int = 2
    """Untimed steps first."""
    seq_len: int = 256
    """Tokens per step (one sequence)."""
    seed: int = 0
    """Seeds the model and the batches."""
    threads: int | None = None
    """torch threads (default: torch's)."""
    json: str = option(str(RESULTS_DIR / f"{NAME}.json"), metavar="PATH")
    """Where to write the results."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(
        NonfiniteCheckConfig, prog=f"benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    args = config_from_namespace(NonfiniteCheckConfig, parse_namespace(parser, argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.model, args.steps, args.warmup, args.seq_len, args.seed)
    rows = [
        (
            arm,
            f"{result[arm]['step_s']['median'] * 1e3:.1f}",
            f"{result[arm]['step_s']['min'] * 1e3:.1f}",
            f"{result[arm]['optimizer_step_s']['median'] * 1e3:.1f}",
        )
        for arm in ("no_check", "check")
    ]
    print(f"{args.model}, fp32, 1 x {args.seq_len} tokens, {args.steps} steps per arm (medians)")
    print(format_table(("arm", "step ms", "fastest step ms", "optimizer.step() ms"), rows))
    print(
        f"check alone {result['check_alone_s']['median'] * 1e3:.2f} ms = "
        f"{result['check_share_of_fastest_step'] * 100:.2f}% of the fastest step; step ratio "
        f"check/no_check: medians {result['step_ratio_check_over_no_check']:.4f}, pairs "
        f"{result['pair_ratio_median']:.4f}, fastest {result['fastest_step_ratio']:.4f}"
    )
    payload = {"benchmark": NAME, "environment": environment(), "result": result}
    print(f"wrote {write_json(args.json, payload)}")
    return payload


if __name__ == "__main__":
    main()
