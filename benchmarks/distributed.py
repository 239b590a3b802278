"""Sharded GradNormLoRP over 1, 2 and 4 CPU ranks: state bytes per rank, communication, SVD time.

For each world size, forked ranks (gloo) train llama_60m (weight-normalized, rank 128) under DDP
for a few steps and report:

- exact optimizer-state bytes per rank (every tensor in the rank's optimizer state) and the
  balance max/min;
- collective payload bytes per step: DDP's gradient all-reduce (every gradient once, as for
  DDP + AdamW) plus our weight broadcasts (counted at the communicator); next to them the bytes
  the alternative design (broadcasting each owner's low-rank update instead of its weights)
  would send, computed exactly from the shapes;
- wall time of ``optimizer.step()`` at a refresh step and at a plain step (max over ranks: the
  critical path), so the SVD cost per rank shows against the world size.

On this 2-core machine 4 ranks oversubscribe the CPU: times at 4 ranks measure contention too.
World size 1 runs in this process on every core; on a busy 2-core machine its refresh step's
SVDs are several times slower than one thread's (OpenMP threads wait for each other).
Usage: ``python -m benchmarks.distributed [--model llama_60m] [--worlds 1 2 4] [--json PATH]``.

``--engines ddp zero2 fsdp2`` runs the engine comparison instead: the same weight-normalised
model, the same ranks (``--worlds``, default 2) and the same global batches, with
GradNormLoRPAdamW (the model's recipe: rank, T, alpha) stepping it under

- ``ddp``: ``DistributedDataParallel`` + our sharded optimizer (``gnlorp-train``'s default);
- ``zero2``: DeepSpeed ZeRO-2 with ours as the client optimizer (as ``deepspeed_zero.py``);
- ``fsdp2``: FSDP2, ``fully_shard`` per decoder layer then the root, fp32 (``DTensor``
  ``Shard(0)`` parameters; the optimizer is built after sharding from the sharded parameters).

Each engine runs in its own forked launch (a fresh process group; a crash or hang there becomes
that engine's error row and the others still run). Per engine it reports the optimizer-state
bytes on each rank (every tensor in ``optimizer.state``; a DTensor counts its local shard), max
and mean over ranks next to one process's total / N (measured here in one process), the local
weight bytes and DeepSpeed's fp32 master partition per rank, and the median over timed steps of
the whole training step (forward, backward, step; the slowest rank per step), each with its ratio
to ``ddp`` measured in the same run. Usage:
``python -m benchmarks.distributed --engines ddp zero2 fsdp2 [--model llama_60m] [--worlds 2]``.

The measuring code is :mod:`gnlorp_dist.bench.sharding` (the world-size table) and
:mod:`gnlorp_dist.bench.engines` / :mod:`~gnlorp_dist.bench.engines_report` (the engines).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gnlorp_dist.bench import engines_report, sharding
from gnlorp_dist.bench.engines import ENGINES, EngineSettings, one_process_state_bytes, run_rounds
from gnlorp_dist.bench.harness import RESULTS_DIR, write_json
from gnlorp_dist.bench.harness import environment as environment_record
from gnlorp_dist.models import llama_config, recipe_for_config
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace


@dataclass(frozen=True, kw_only=True)
class DistributedBenchConfig:
    """The world-size table, or (``--engines``) the engine comparison on one world size."""

    model: str = option("llama_60m", metavar="NAME")
    """A named LLaMA shape and recipe (llama_nano, llama_micro, llama_60m ...)."""
    worlds: tuple[int, ...] | None = option(None, metavar="N")
    """World sizes (forked gloo ranks) of the table (default 1 2 4); with --engines the ONE
    world size of the comparison (default 2)."""
    json: str | None = option(None, metavar="PATH")
    """Where to write the results (default benchmarks/results/distributed.json; with --engines
    distributed_engines.json)."""
    engines: tuple[str, ...] | None = option(None, choices=ENGINES, metavar="ENGINE")
    """Compare these engines (ddp, zero2, fsdp2) on one world size instead of the table."""
    steps: int = 8
    """--engines: timed steps per launch."""
    warmup: int = 2
    """--engines: untimed steps first (step 0 refreshes the subspaces)."""
    batch: int = 1
    """--engines: micro batch per rank."""
    seq: int = 64
    """--engines: tokens per sequence."""
    timeout: float = 900.0
    """--engines: seconds an engine's launch may take; a hung launch becomes its error row."""
    rounds: int = 1
    """--engines: launch each engine this often, the order rotating."""


def engines_mode(config: DistributedBenchConfig) -> dict[str, Any]:
    """Launch the engines, print their table, and return the record."""
    world = config.worlds[0] if config.worlds else 2
    settings = EngineSettings(
        model=config.model, world_size=world, warmup=config.warmup, steps=config.steps,
        batch=config.batch, seq=config.seq, timeout_s=config.timeout,
    )  # fmt: skip
    assert config.engines is not None
    runs, errors = run_rounds(config.engines, settings, config.rounds)
    rows = engines_report.engine_rows(config.engines, runs, errors)
    torch.set_num_threads(os.cpu_count() or 1)
    one_process = one_process_state_bytes(settings)
    engines_report.add_engine_ratios(rows, one_process, world)
    gaps = engines_report.add_loss_gaps(rows)
    spec = recipe_for_config(llama_config(config.model))
    print(engines_report.report(rows, settings, spec, config.rounds, one_process, gaps))
    return {
        "benchmark": "distributed_engines",
        "model": config.model,
        "settings": asdict(settings),
        "rounds": config.rounds,
        "recipe": asdict(spec),
        "first_step_loss": engines_report.first_step_losses(rows),
        "rows": rows,
        "environment": environment_record(),
    }


def worlds_mode(config: DistributedBenchConfig) -> dict[str, Any]:
    """Run every world size, print the tables, and return the record."""
    rows = sharding.run_worlds(config.model, config.worlds or (1, 2, 4))
    print(sharding.tables(rows, config.model))
    return {
        "benchmark": "distributed",
        "model": config.model,
        "steps": sharding.STEPS,
        "update_proj_gap": sharding.GAP,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        DistributedBenchConfig, prog="benchmarks.distributed", description=__doc__.splitlines()[0]
    )
    config = config_from_namespace(DistributedBenchConfig, parse_namespace(parser, argv))
    if config.engines is None:
        record, name = worlds_mode(config), "distributed"
    else:
        if config.worlds is not None and len(config.worlds) != 1:
            parser.error("--engines compares on ONE world size: give one --worlds value")
        if config.steps < 1 or config.warmup < 0 or config.rounds < 1:
            parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
        record, name = engines_mode(config), "distributed_engines"
    path = write_json(config.json or RESULTS_DIR / f"{name}.json", record)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
