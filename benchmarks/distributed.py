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
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.bench.harness import environment, format_table
from gnlorp_dist.distributed import ProcessGroupCommunicator
from gnlorp_dist.memory.bytes import entry_tensors
from gnlorp_dist.memory.bytes import optimizer_state_bytes as bytes_of_states
from gnlorp_dist.models import build_model, llama_config, model_spec, recipe_for_config
from gnlorp_dist.optim.comm import LocalCommunicator
from gnlorp_dist.optim.projection import low_rank_shape, projection_side

STEPS = 4  # refreshes at steps 0 and 2
GAP = 2


class CountingCommunicator(ProcessGroupCommunicator):
    """Counts the payload bytes this rank puts into broadcasts and all-reduces."""

    def __init__(self) -> None:
        super().__init__()
        self.broadcast_bytes = 0
        self.all_reduce_bytes = 0
        self.reduce_bytes = 0

    def reduce_sum(self, tensor, dst):
        self.reduce_bytes += tensor.numel() * tensor.element_size()
        return super().reduce_sum(tensor, dst)

    def broadcast(self, tensor, src):
        self.broadcast_bytes += tensor.numel() * tensor.element_size()
        return super().broadcast(tensor, src)

    def all_reduce_sum(self, tensor):
        self.all_reduce_bytes += tensor.numel() * tensor.element_size()
        return super().all_reduce_sum(tensor)


def _low_rank_update_bytes(optimizer) -> int:
    """Bytes the owners would broadcast if they sent low-rank updates instead of weights."""
    total = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if "rank" in group:
                side = projection_side(param.shape, group["proj_type"])
                rows, cols = low_rank_shape(param.shape, group["rank"], side)
                total += rows * cols * param.element_size()
            else:
                total += param.numel() * param.element_size()
    return total


def _run_rank(rank, world_size, model_name, out_dir, init_file, mode):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
    spec = model_spec(model_name)
    model = apply_weight_norm(build_model(llama_config(model_name), dtype=torch.float32, seed=0))
    groups = projected_param_groups(model, rank=spec.rank, update_proj_gap=GAP, scale=0.25)
    comm = CountingCommunicator() if world_size > 1 else LocalCommunicator()
    reduce_mode = mode == "reduce" and world_size > 1
    optimizer = GradNormLoRPAdamW(groups, lr=1e-3, communicator=comm, reduce_gradients=reduce_mode)
    wrapped = DistributedDataParallel(model) if world_size > 1 and not reduce_mode else model
    step_times = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 32000, (world_size, 64), generator=gen)[rank : rank + 1]
        optimizer.zero_grad()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        start = time.perf_counter()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    state_bytes = bytes_of_states(optimizer)["total"]
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "rank": rank,
        "state_bytes": state_bytes,
        "refreshes": optimizer.refresh_count,
        "refresh_step_s": [step_times[i] for i in range(STEPS) if i % GAP == 0],
        "plain_step_s": [step_times[i] for i in range(STEPS) if i % GAP != 0],
        "ddp_allreduce_bytes_per_step": grad_bytes if world_size > 1 and not reduce_mode else 0,
        "dense_adamw_ddp_bytes_per_step": grad_bytes if world_size > 1 else 0,
        "reduce_bytes_per_step": getattr(comm, "reduce_bytes", 0) // STEPS,
        "broadcast_bytes_per_step": getattr(comm, "broadcast_bytes", 0) // STEPS,
        "verdict_allreduce_bytes_per_step": getattr(comm, "all_reduce_bytes", 0) // STEPS,
        "low_rank_alternative_bytes_per_step": _low_rank_update_bytes(optimizer)
        if world_size > 1
        else 0,
    }
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if world_size > 1:
        dist.destroy_process_group()


def measure(model_name: str, world_size: int, mode: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        if world_size == 1:
            _run_rank(0, 1, model_name, tmp, init_file, mode)
        else:
            mp.start_processes(
                _run_rank,
                args=(world_size, model_name, tmp, init_file, mode),
                nprocs=world_size,
                start_method="fork",
            )
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]


def summarise(world_size: int, mode: str, ranks: list[dict]) -> dict:
    states = [r["state_bytes"] for r in ranks]
    return {
        "world_size": world_size,
        "mode": mode,
        "state_bytes_per_rank": states,
        "state_bytes_total": sum(states),
        "balance_max_over_min": max(states) / min(states),
        "refreshes_per_rank": [r["refreshes"] for r in ranks],
        "refresh_step_s_max_rank": max(max(r["refresh_step_s"]) for r in ranks),
        "plain_step_s_max_rank": max(max(r["plain_step_s"]) for r in ranks),
        "ddp_allreduce_bytes_per_step": ranks[0]["ddp_allreduce_bytes_per_step"],
        "dense_adamw_ddp_bytes_per_step": ranks[0]["dense_adamw_ddp_bytes_per_step"],
        "reduce_bytes_per_step": ranks[0]["reduce_bytes_per_step"],
        "broadcast_bytes_per_step": ranks[0]["broadcast_bytes_per_step"],
        "verdict_allreduce_bytes_per_step": ranks[0]["verdict_allreduce_bytes_per_step"],
        "low_rank_alternative_bytes_per_step": ranks[0]["low_rank_alternative_bytes_per_step"],
    }


def print_table(rows: list[dict], model_name: str) -> None:
    print(f"\nSharded GradNormLoRPAdamW, {model_name}, fp32, gloo (CPU)")
    header = (
        f"{'ranks':>5} {'mode':>6} {'state/rank (MiB)':>26} {'max/min':>8} {'total MiB':>10} "
        f"{'refresh s':>10} {'plain s':>8} {'SVDs/rank':>14}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        per_rank = " ".join(f"{b / 2**20:.2f}" for b in row["state_bytes_per_rank"])
        print(
            f"{row['world_size']:>5} {row['mode']:>6} {per_rank:>26} "
            f"{row['balance_max_over_min']:>8.3f} {row['state_bytes_total'] / 2**20:>10.2f} "
            f"{row['refresh_step_s_max_rank']:>10.3f} {row['plain_step_s_max_rank']:>8.3f} "
            f"{str(row['refreshes_per_rank']):>14}"
        )
    print(
        "\nCollective payload per step and rank (MiB). Baseline: DDP + torch AdamW, which "
        "all-reduces every gradient."
    )
    header = (
        f"{'ranks':>5} {'mode':>6} {'all-reduce':>11} {'reduce':>8} {'broadcast':>10} "
        f"{'total':>8} {'baseline':>9} {'ratio':>6} {'alt low-rank bcast':>19}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["world_size"] == 1:
            continue
        allreduce = row["ddp_allreduce_bytes_per_step"] + row["verdict_allreduce_bytes_per_step"]
        total = allreduce + row["reduce_bytes_per_step"] + row["broadcast_bytes_per_step"]
        baseline = row["dense_adamw_ddp_bytes_per_step"]
        mib = 2**20
        print(
            f"{row['world_size']:>5} {row['mode']:>6} {allreduce / mib:>11.2f} "
            f"{row['reduce_bytes_per_step'] / mib:>8.2f} "
            f"{row['broadcast_bytes_per_step'] / mib:>10.2f} {total / mib:>8.2f} "
            f"{baseline / mib:>9.2f} {total / baseline:>6.3f} "
            f"{row['low_rank_alternative_bytes_per_step'] / mib:>19.2f}"
        )
    print(
        "A reduce plus a broadcast of S bytes cost what one all-reduce of S costs on a ring "
        "(reduce-scatter + all-gather), so mode 'reduce' matches the baseline's wire traffic; "
        "mode 'ddp' adds a broadcast on top of DDP's all-reduce."
    )


# -- engines: DDP, DeepSpeed ZeRO-2 and FSDP2 on the same model and ranks -----------------------

ENGINES: tuple[str, ...] = ("ddp", "zero2", "fsdp2")
"""The engines ``--engines`` knows, in table order; every ratio is against ``ddp``."""

ENGINE_LR, ENGINE_BETAS, ENGINE_EPS = 1e-3, (0.9, 0.999), 1e-6  # as deepspeed_zero.py; no decay


@dataclass(frozen=True)
class EngineSettings:
    """What every engine of one comparison shares."""

    model: str
    world_size: int = 2
    warmup: int = 2  # untimed; step 0 is the recipe's first subspace refresh (SVDs)
    steps: int = 8  # timed
    batch: int = 1  # micro batch per rank
    seq: int = 64
    seed: int = 0
    timeout_s: float = 900.0  # per engine launch: a hung collective becomes an error row


def local_nbytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` held by this rank: a DTensor counts its local shard
    (``DTensor.nbytes`` would be the global tensor's), containers are walked, numbers count 0."""
    return sum(t.nbytes for t in entry_tensors(value))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """``state``: every tensor in ``optimizer.state`` on this rank; ``proj``: of those, the
    projection bases (key ``proj``), apart because FSDP2 and ZeRO can duplicate them."""
    counts = bytes_of_states(optimizer)
    return {"state": counts["total"], "proj": counts["projection"]}


def _engine_batch(step: int, rank: int, settings: EngineSettings, vocab: int) -> torch.Tensor:
    """This rank's rows of the global batch of ``step``: the same data for every engine."""
    gen = torch.Generator().manual_seed(settings.seed * 100_003 + step)
    rows = settings.batch * settings.world_size
    ids = torch.randint(0, vocab, (rows, settings.seq), generator=gen)
    return ids.chunk(settings.world_size)[rank]


def _projected_optimizer(model: torch.nn.Module) -> tuple[GradNormLoRPAdamW, int]:
    """GradNormLoRPAdamW at the model's recipe over ``model``'s parameters as they are now (for
    FSDP2: the sharded DTensors), and the number of projected matrices."""
    spec = recipe_for_config(model.config)
    groups = projected_param_groups(
        model, rank=spec.rank, update_proj_gap=spec.update_proj_gap, scale=spec.scale
    )
    projected = sum(len(g["params"]) for g in groups if "rank" in g)
    optimizer = GradNormLoRPAdamW(
        groups, lr=ENGINE_LR, betas=ENGINE_BETAS, eps=ENGINE_EPS, weight_decay=0.0
    )
    return optimizer, projected


def _fully_shard(model: torch.nn.Module) -> str:
    """FSDP2 on ``model``: the library's helper when it is there, else the same recipe here
    (each decoder layer, then the root, which keeps its parameters gathered after forward).
    Returns which one was used, for the record."""
    if importlib.util.find_spec("gnlorp_dist.integrations.fsdp2") is not None:
        # It registers the FSDP2 row layout with the optimizer; ``import gnlorp_dist`` does too
        # (its docstring), importing it here as well costs nothing and does not depend on that.
        importlib.import_module("gnlorp_dist.integrations.fsdp2")
    try:
        from gnlorp_dist.distributed import fully_shard_model  # noqa: PLC0415
    except ImportError:
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=False)
        return "torch fully_shard (per layer + root)"
    fully_shard_model(model)
    return "gnlorp_dist.distributed.fully_shard_model"


def _run_engine(engine: str, settings: EngineSettings, rank: int) -> dict[str, Any]:
    """Build ``engine`` on this rank (process group up), train warmup + steps steps, count."""
    config = llama_config(settings.model)
    model = apply_weight_norm(build_model(config, dtype=torch.float32, seed=settings.seed))
    weights_full = sum(p.numel() * p.element_size() for p in model.parameters())
    master_bytes = 0
    how = ""
    if engine == "ddp":
        optimizer, projected = _projected_optimizer(model)
        wrapped = DistributedDataParallel(model)
        how = "DistributedDataParallel"

        def train_step(ids: torch.Tensor) -> torch.Tensor:
            loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    elif engine == "zero2":
        from benchmarks.deepspeed_zero import (  # noqa: PLC0415  (DeepSpeed only when asked)
            OURS,
            Case,
            RunSettings,
            deepspeed_config,
            import_deepspeed,
            master_partitions,
        )

        deepspeed = import_deepspeed("cpu")
        optimizer, projected = _projected_optimizer(model)
        ds_settings = RunSettings(config=config, batch=settings.batch, seq=settings.seq)
        ds_config = deepspeed_config(Case(OURS, 2), ds_settings, settings.world_size)
        ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        how = f"deepspeed {deepspeed.__version__} {type(ds_engine.optimizer).__name__}"

        def train_step(ids: torch.Tensor) -> torch.Tensor:
            loss = ds_engine(input_ids=ids, labels=ids, use_cache=False).loss
            ds_engine.backward(loss)
            ds_engine.step()
            return loss

    elif engine == "fsdp2":
        how = _fully_shard(model)
        optimizer, projected = _projected_optimizer(model)  # after sharding: the DTensors

        def train_step(ids: torch.Tensor) -> torch.Tensor:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    else:
        raise ValueError(f"engine {engine!r} is not known; use one of {ENGINES}")

    losses: list[float] = []
    step_s: list[float] = []
    for step in range(settings.warmup + settings.steps):
        ids = _engine_batch(step, rank, settings, config.vocab_size)
        dist.barrier()  # every rank starts the step together: the time is the step, not skew
        start = time.perf_counter()
        loss = train_step(ids)
        elapsed = time.perf_counter() - start
        losses.append(float(loss.detach()))
        if step >= settings.warmup:
            step_s.append(elapsed)
    if engine == "zero2":
        master_bytes = sum(
            t.numel() * t.element_size() for t in master_partitions(ds_engine.optimizer)
        )
    counts = optimizer_state_bytes(optimizer)
    return {
        "engine": engine,
        "rank": rank,
        "how": how,
        "state_bytes": counts["state"],
        "proj_bytes": counts["proj"],
        "weight_bytes": sum(local_nbytes(p) for p in model.parameters()),
        "weight_bytes_full": weights_full,
        "master_bytes": master_bytes,
        "refreshes": optimizer.refresh_count,
        "projected_matrices": projected,
        "losses": losses,
        "step_s": step_s,
    }


def _engine_rank(rank: int, engine: str, settings: EngineSettings, out_dir: str) -> None:
    # The ranks share the cores: one slice of threads each keeps them from fighting over them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.world_size))
    init_file = str(Path(out_dir) / "rendezvous")
    if engine == "zero2":
        from benchmarks.deepspeed_zero import distributed as deepspeed_group  # noqa: PLC0415

        with deepspeed_group(rank, settings.world_size, init_file, "cpu"):
            result = _run_engine(engine, settings, rank)
    else:
        # What torchrun exports: the optimizer's default communicator reads WORLD_SIZE to tell a
        # job from one process (without it every rank would keep the whole, unsharded state).
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(settings.world_size), LOCAL_RANK=str(rank))
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=settings.world_size,
            timeout=datetime.timedelta(seconds=settings.timeout_s),
        )
        try:
            result = _run_engine(engine, settings, rank)
        finally:
            dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _failure_summary(err: BaseException) -> str:
    """The last line of a rank's traceback (what went wrong) and the deepest gnlorp_dist frame
    (where); the whole traceback goes to the JSON."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    what = lines[-1] if lines else type(err).__name__
    frames = [line for line in lines if line.startswith("File ") and "gnlorp_dist" in line]
    if not frames:
        return what
    # 'File ".../gnlorp_dist/optim/comm.py", line 176, in step_verdict'
    path, _, rest = frames[-1].removeprefix('File "').partition('", line ')
    where = "gnlorp_dist" + path.rpartition("gnlorp_dist")[2] + ":" + rest.split(",")[0]
    return f"{what} (at {where})"


def launch_engine(engine: str, settings: EngineSettings) -> list[dict[str, Any]]:
    """``engine`` on ``settings.world_size`` forked gloo ranks: one result per rank. A rank
    that fails or a launch that outlives ``timeout_s`` raises RuntimeError with the reason."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _engine_rank,
            args=(engine, settings, tmp),
            nprocs=settings.world_size,
            join=False,
            start_method="fork",
        )
        deadline = time.monotonic() + settings.timeout_s
        try:
            while not context.join(timeout=2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{engine} still running after {settings.timeout_s:.0f} s")
        except Exception as err:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise RuntimeError(_failure_summary(err)) from err
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(settings.world_size)]


def one_process_state_bytes(settings: EngineSettings) -> int:
    """Optimizer-state bytes of the same optimizer on the whole model in ONE process, after one
    step (state size depends on shapes only, not on values or step count)."""
    config = llama_config(settings.model)
    model = apply_weight_norm(build_model(config, dtype=torch.float32, seed=settings.seed))
    spec = recipe_for_config(config)
    groups = projected_param_groups(
        model, rank=spec.rank, update_proj_gap=spec.update_proj_gap, scale=spec.scale
    )
    optimizer = GradNormLoRPAdamW(
        groups, lr=ENGINE_LR, betas=ENGINE_BETAS, eps=ENGINE_EPS, communicator=LocalCommunicator()
    )
    ids = _engine_batch(0, 0, settings, config.vocab_size)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    return optimizer_state_bytes(optimizer)["state"]


def pool_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per rank from several launches of one engine: the first launch's counts and
    losses (the same in every launch: same seed, same data), every launch's timed steps."""
    pooled = [dict(rank) for rank in rounds[0]]
    for rank, result in enumerate(pooled):
        result["step_s"] = [t for launch in rounds for t in launch[rank]["step_s"]]
        # Each launch's median step (slowest rank per step): the ratios to DDP pair launches
        # of the same round, which ran close together in time.
        result["launch_medians_s"] = [
            statistics.median(max(times) for times in zip(*(r["step_s"] for r in launch)))
            for launch in rounds
        ]
    return pooled


def summarise_engine(engine: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every rank's result: per-rank lists, max/mean, the median step time."""
    states = [r["state_bytes"] for r in per_rank]
    # The slowest rank is the step's time (the next collective waits for it).
    per_step = [max(times) for times in zip(*(r["step_s"] for r in per_rank))]
    return {
        "engine": engine,
        "how": per_rank[0]["how"],
        "state_bytes_per_rank": states,
        "state_bytes_max": max(states),
        "state_bytes_mean": statistics.fmean(states),
        "proj_bytes_per_rank": [r["proj_bytes"] for r in per_rank],
        "weight_bytes_per_rank": [r["weight_bytes"] for r in per_rank],
        "weight_bytes_full": per_rank[0]["weight_bytes_full"],
        "master_bytes_per_rank": [r["master_bytes"] for r in per_rank],
        "refreshes_per_rank": [r["refreshes"] for r in per_rank],
        "projected_matrices": per_rank[0]["projected_matrices"],
        "losses_rank0": per_rank[0]["losses"],
        "losses_per_rank": [r["losses"] for r in per_rank],
        "step_s_per_rank": [r["step_s"] for r in per_rank],
        "step_s_slowest_rank": per_step,
        "step_s_median": statistics.median(per_step),
        "launch_step_s_medians": per_rank[0].get("launch_medians_s", [statistics.median(per_step)]),
        "error": None,
    }


def add_engine_ratios(rows: list[dict[str, Any]], one_process_bytes: int, world: int) -> None:
    """Ratios against ``ddp`` of this run (None where ddp failed or was not asked for), and
    the max per-rank state against one process's total / N."""
    reference = one_process_bytes / world
    ddp = next((r for r in rows if r["engine"] == "ddp" and r["error"] is None), None)
    for row in rows:
        row["one_process_state_bytes"] = one_process_bytes
        row["one_process_state_bytes_over_n"] = reference
        if row["error"] is not None:
            continue
        row["state_max_over_one_process_n"] = row["state_bytes_max"] / reference
        row["state_max_over_ddp"] = row["state_bytes_max"] / ddp["state_bytes_max"] if ddp else None
        row["step_median_over_ddp"] = None
        if ddp:
            # Median over rounds of (this launch's median / DDP's in the same round): a shared
            # machine's load moves between rounds far more than within one.
            pairs = zip(row["launch_step_s_medians"], ddp["launch_step_s_medians"])
            row["step_median_over_ddp"] = statistics.median(a / b for a, b in pairs)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def engine_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "engine",
        "state B/rank max",
        "mean",
        "1-proc/N",
        "max x 1-proc/N",
        "x ddp",
        "proj B/rank max",
        "weights B/rank",
        "master B/rank",
        "step ms",
        "x ddp",
        "SVDs/rank",
        "last loss",
    ]
    body = []
    for r in rows:
        if r["error"] is not None:
            body.append([r["engine"], "failed (below)"] + ["-"] * (len(headers) - 2))
            continue
        body.append(
            [
                r["engine"],
                f"{r['state_bytes_max']:,}",
                f"{r['state_bytes_mean']:,.0f}",
                f"{r['one_process_state_bytes_over_n']:,.0f}",
                f"{r['state_max_over_one_process_n']:.3f}",
                _fmt(r["state_max_over_ddp"], ".3f"),
                f"{max(r['proj_bytes_per_rank']):,}",
                f"{max(r['weight_bytes_per_rank']):,}",
                f"{max(r['master_bytes_per_rank']):,}",
                f"{r['step_s_median'] * 1e3:.1f}",
                _fmt(r["step_median_over_ddp"], ".3f"),
                "/".join(str(n) for n in r["refreshes_per_rank"]),
                f"{r['losses_rank0'][-1]:.4f}",
            ]
        )
    return format_table(headers, body)


def engines_mode(args: argparse.Namespace) -> dict[str, Any]:
    world = args.worlds[0] if args.worlds else 2
    settings = EngineSettings(
        model=args.model,
        world_size=world,
        warmup=args.warmup,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        timeout_s=args.timeout,
    )
    if "zero2" in args.engines:
        # Import DeepSpeed (5 s) once here so every forked rank inherits it.
        from benchmarks.deepspeed_zero import import_deepspeed  # noqa: PLC0415

        import_deepspeed("cpu")
    # Every round launches each engine once, the order rotating, so a slow spell of a shared
    # machine does not land on one engine only; an engine's step times pool over the rounds.
    runs: dict[str, list[list[dict[str, Any]]]] = {engine: [] for engine in args.engines}
    errors: dict[str, tuple[str, str]] = {}
    for round_index in range(args.rounds):
        shift = round_index % len(args.engines)
        for engine in args.engines[shift:] + args.engines[:shift]:
            if engine in errors:
                continue
            started = time.perf_counter()
            try:
                runs[engine].append(launch_engine(engine, settings))
                status = "ok"
            except RuntimeError as err:
                detail = "".join(traceback.format_exception(err.__cause__ or err))
                errors[engine] = (str(err), detail)
                status = f"failed: {err}"
            elapsed = time.perf_counter() - started
            print(f"round {round_index + 1}, {engine}: {elapsed:.0f} s, {status}", flush=True)
    rows: list[dict[str, Any]] = []
    for engine in args.engines:
        if engine in errors:
            error, detail = errors[engine]
            rows.append({"engine": engine, "error": error, "error_detail": detail})
        else:
            rows.append(summarise_engine(engine, pool_rounds(runs[engine])))
    torch.set_num_threads(os.cpu_count() or 1)
    one_process = one_process_state_bytes(settings)
    add_engine_ratios(rows, one_process, world)
    spec = recipe_for_config(llama_config(args.model))
    ok = [r for r in rows if r["error"] is None]
    first_losses = {r["engine"]: r["losses_rank0"][0] for r in ok}
    print(
        f"\n{args.model}, fp32, GradNormLoRPAdamW (rank {spec.rank}, T={spec.update_proj_gap}, "
        f"alpha {spec.scale}) on {world} gloo ranks; {settings.batch} x {settings.seq} tokens per "
        f"rank; step ms = median over {settings.steps} steps after {settings.warmup} warm-up "
        f"(step 0 refreshes) x {args.rounds} launch(es) per engine, order rotating, slowest "
        "rank per step; its x ddp = median over rounds of the ratio of launch medians; bytes "
        "exact, after the last step:"
    )
    print(engine_table(rows))
    print(
        f"1-proc/N: one process's optimizer state ({one_process:,} B) / {world}. proj: the "
        "projection bases (inside state). weights: this rank's parameter bytes (FSDP2: its "
        "shard). master: DeepSpeed's fp32 master partition (not in state)."
    )
    for row in rows:
        if row["error"] is not None:
            print(f"{row['engine']} failed: {row['error']} (traceback in the JSON)")
    ddp = next((r for r in ok if r["engine"] == "ddp"), None)
    if ddp is not None:
        # Same weights, same data, same optimizer: every engine should follow DDP's losses.
        gaps = {
            r["engine"]: max(abs(a - b) for a, b in zip(r["losses_rank0"], ddp["losses_rank0"]))
            for r in ok
            if r is not ddp
        }
        for row in ok:
            row["loss_max_abs_diff_vs_ddp"] = gaps.get(row["engine"], 0.0)
        if gaps:
            listed = ", ".join(f"{name} {gap:.2e}" for name, gap in gaps.items())
            print(f"rank 0's loss, max |difference| from ddp's over all steps: {listed}")
    if len(set(first_losses.values())) > 1:
        print(f"note: the first-step losses differ across engines: {first_losses}")
    return {
        "benchmark": "distributed_engines",
        "model": args.model,
        "settings": asdict(settings),
        "rounds": args.rounds,
        "recipe": asdict(spec),
        "first_step_loss": first_losses,
        "rows": rows,
        "environment": environment(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument(
        "--worlds", type=int, nargs="+", default=None, help="default 1 2 4; with --engines: 2"
    )
    parser.add_argument("--json", default=None, help="default benchmarks/results/distributed.json")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=ENGINES,
        default=None,
        help="compare these engines on one world size instead (distributed_engines.json)",
    )
    engine_args = parser.add_argument_group("--engines options")
    engine_args.add_argument("--steps", type=int, default=8, help="timed steps")
    engine_args.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    engine_args.add_argument("--batch", type=int, default=1, help="micro batch per rank")
    engine_args.add_argument("--seq", type=int, default=64)
    engine_args.add_argument("--timeout", type=float, default=900.0, help="s per engine launch")
    engine_args.add_argument(
        "--rounds", type=int, default=1, help="launch each engine this often, order rotating"
    )
    args = parser.parse_args(argv)
    if args.engines is not None:
        if args.worlds is not None and len(args.worlds) != 1:
            parser.error("--engines compares on ONE world size: give one --worlds value")
        if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
            parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
        record = engines_mode(args)
        path = Path(args.json or "benchmarks/results/distributed_engines.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {path}")
        return 0
    args.worlds = args.worlds or [1, 2, 4]
    args.json = args.json or "benchmarks/results/distributed.json"
    rows = []
    for world_size in args.worlds:
        for mode in ("ddp", "reduce") if world_size > 1 else ("ddp",):
            rows.append(summarise(world_size, mode, measure(args.model, world_size, mode)))
    print_table(rows, args.model)
    record = {
        "benchmark": "distributed",
        "model": args.model,
        "steps": STEPS,
        "update_proj_gap": GAP,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
