"""DDP, DeepSpeed ZeRO-2 and FSDP2 stepping the same GradNormLoRPAdamW on the same model, ranks and
global batches (``python -m benchmarks.distributed --engines ...``): the running part.

Each engine runs in its own forked launch (:func:`launch_engine`: a fresh process group; a crash
or hang there becomes that engine's error and the others still run); every rank builds the
engine, trains warmup + timed steps and counts its bytes (:func:`run_engine`).
:func:`run_rounds` launches every engine once per round, the order rotating.
:mod:`gnlorp_dist.bench.engines_report` makes rows, ratios and the table of the results.
DeepSpeed is imported inside functions only, when ``zero2`` runs.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.distributed import LocalCommunicator, fully_shard_model
from gnlorp_dist.distributed.rendezvous import barrier, end_forked_rank, join_file_group
from gnlorp_dist.memory.bytes import entry_tensors
from gnlorp_dist.memory.bytes import optimizer_state_bytes as bytes_of_states
from gnlorp_dist.models import build_model, llama_config, recipe_for_config

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


def engine_batch(step: int, rank: int, settings: EngineSettings, vocab: int) -> torch.Tensor:
    """This rank's rows of the global batch of ``step``: the same data for every engine."""
    gen = torch.Generator().manual_seed(settings.seed * 100_003 + step)
    rows = settings.batch * settings.world_size
    ids = torch.randint(0, vocab, (rows, settings.seq), generator=gen)
    return ids.chunk(settings.world_size)[rank]


def projected_optimizer(model: torch.nn.Module) -> tuple[GradNormLoRPAdamW, int]:
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


@dataclass
class BuiltEngine:
    """One engine on this rank: how one training step runs, and what the report reads."""

    how: str
    optimizer: GradNormLoRPAdamW
    projected: int
    train_step: Callable[[torch.Tensor], torch.Tensor]
    master_bytes: Callable[[], int] = lambda: 0


def _plain_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer):
    def train_step(ids: torch.Tensor) -> torch.Tensor:
        loss = module(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return train_step


def _build_zero2(model: torch.nn.Module, settings: EngineSettings) -> BuiltEngine:
    from gnlorp_dist.bench.zero import (  # noqa: PLC0415  (DeepSpeed only when asked)
        OURS,
        Case,
        RunSettings,
        deepspeed_config,
        import_deepspeed,
        master_partitions,
    )

    deepspeed = import_deepspeed("cpu")
    optimizer, projected = projected_optimizer(model)
    ds_settings = RunSettings(config=model.config, batch=settings.batch, seq=settings.seq)
    ds_config = deepspeed_config(Case(OURS, 2), ds_settings, settings.world_size)
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    def train_step(ids: torch.Tensor) -> torch.Tensor:
        loss = ds_engine(input_ids=ids, labels=ids, use_cache=False).loss
        ds_engine.backward(loss)
        ds_engine.step()
        return loss

    def master_bytes() -> int:
        return sum(t.numel() * t.element_size() for t in master_partitions(ds_engine.optimizer))

    how = f"deepspeed {deepspeed.__version__} {type(ds_engine.optimizer).__name__}"
    return BuiltEngine(how, optimizer, projected, train_step, master_bytes)


def build_engine(engine: str, model: torch.nn.Module, settings: EngineSettings) -> BuiltEngine:
    """``engine`` around ``model`` on this rank (process group up)."""
    if engine == "ddp":
        optimizer, projected = projected_optimizer(model)
        wrapped = DistributedDataParallel(model)
        return BuiltEngine(
            "DistributedDataParallel", optimizer, projected, _plain_step(wrapped, optimizer)
        )
    if engine == "zero2":
        return _build_zero2(model, settings)
    if engine == "fsdp2":
        # Each decoder layer, then the root, which keeps its parameters gathered after forward.
        fully_shard_model(model)
        optimizer, projected = projected_optimizer(model)  # after sharding: the DTensors
        how = "gnlorp_dist.distributed.fully_shard_model"
        return BuiltEngine(how, optimizer, projected, _plain_step(model, optimizer))
    raise ValueError(f"engine {engine!r} is not known; use one of {ENGINES}")


def run_engine(engine: str, settings: EngineSettings, rank: int) -> dict[str, Any]:
    """Build ``engine`` on this rank (process group up), train warmup + steps steps, count."""
    config = llama_config(settings.model)
    model = apply_weight_norm(build_model(config, dtype=torch.float32, seed=settings.seed))
    weights_full = sum(p.numel() * p.element_size() for p in model.parameters())
    built = build_engine(engine, model, settings)
    losses: list[float] = []
    step_s: list[float] = []
    for step in range(settings.warmup + settings.steps):
        ids = engine_batch(step, rank, settings, config.vocab_size)
        barrier()  # every rank starts the step together: the time is the step, not skew
        start = time.perf_counter()
        loss = built.train_step(ids)
        elapsed = time.perf_counter() - start
        losses.append(float(loss.detach()))
        if step >= settings.warmup:
            step_s.append(elapsed)
    counts = optimizer_state_bytes(built.optimizer)
    return {
        "engine": engine,
        "rank": rank,
        "how": built.how,
        "state_bytes": counts["state"],
        "proj_bytes": counts["proj"],
        "weight_bytes": sum(local_nbytes(p) for p in model.parameters()),
        "weight_bytes_full": weights_full,
        "master_bytes": built.master_bytes(),
        "refreshes": built.optimizer.refresh_count,
        "projected_matrices": built.projected,
        "losses": losses,
        "step_s": step_s,
    }


def _engine_rank(rank: int, engine: str, settings: EngineSettings, out_dir: str) -> None:
    # The ranks share the cores: one slice of threads each keeps them from fighting over them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.world_size))
    init_file = str(Path(out_dir) / "rendezvous")
    if engine == "zero2":
        from gnlorp_dist.bench.zero import distributed as deepspeed_group  # noqa: PLC0415

        with deepspeed_group(rank, settings.world_size, init_file, "cpu"):
            result = run_engine(engine, settings, rank)
    else:
        # What torchrun exports: the optimizer's default communicator reads WORLD_SIZE to tell a
        # job from one process (without it every rank would keep the whole, unsharded state).
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(settings.world_size), LOCAL_RANK=str(rank))
        timeout = datetime.timedelta(seconds=settings.timeout_s)
        join_file_group(rank, settings.world_size, init_file, timeout=timeout)
        result = run_engine(engine, settings, rank)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    end_forked_rank()


def failure_summary(err: BaseException) -> str:
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
            raise RuntimeError(failure_summary(err)) from err
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
    ids = engine_batch(0, 0, settings, config.vocab_size)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    return optimizer_state_bytes(optimizer)["state"]


def run_rounds(
    engines: tuple[str, ...], settings: EngineSettings, rounds: int
) -> tuple[dict[str, list[list[dict[str, Any]]]], dict[str, tuple[str, str]]]:
    """Every engine's launches (``[launch][rank]``) and the engines that failed (message,
    traceback). Every round launches each engine once, the order rotating, so a slow spell of
    a shared machine does not land on one engine only."""
    if "zero2" in engines:
        # Import DeepSpeed (5 s) once here so every forked rank inherits it.
        from gnlorp_dist.bench.zero import import_deepspeed  # noqa: PLC0415

        import_deepspeed("cpu")
    runs: dict[str, list[list[dict[str, Any]]]] = {engine: [] for engine in engines}
    errors: dict[str, tuple[str, str]] = {}
    for round_index in range(rounds):
        shift = round_index % len(engines)
        for engine in engines[shift:] + engines[:shift]:
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
    return runs, errors
