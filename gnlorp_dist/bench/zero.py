"""GradNormLoRPAdamW under DeepSpeed ZeRO, the running part of ``python -m
benchmarks.deepspeed_zero``: configs, one training run per case on each rank, forked launches.

A :class:`Case` is one optimizer at one ZeRO stage in one precision: ``gradnormlorp`` (ours as
DeepSpeed's client optimizer on the weight-normalised model; ``gradnormlorp-8bit`` at
``bits=8``) or ``deepspeed-adamw`` (DeepSpeed's own AdamW from the config block, on the plain
model). :func:`run_case` trains one case on this rank and counts its exact bytes from the live
objects after the last step; :func:`launch` runs a list of cases on forked gloo ranks (or, at
world size 1, in this process). :mod:`gnlorp_dist.bench.zero_report` makes rows and tables.

DeepSpeed is imported inside functions only (:func:`import_deepspeed`: 5 s, and its accelerator
must be chosen before the first import).
"""

from __future__ import annotations

import gc
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.distributed.rendezvous import leave_process_group
from gnlorp_dist.memory.bytes import optimizer_state_bytes
from gnlorp_dist.models import build_model, recipe_for_config

if TYPE_CHECKING:
    from transformers import LlamaConfig

OURS = "gradnormlorp"
OURS_8BIT = "gradnormlorp-8bit"
DEEPSPEED_ADAMW = "deepspeed-adamw"
OPTIMIZERS: tuple[str, ...] = (OURS, OURS_8BIT, DEEPSPEED_ADAMW)
"""Every optimizer the benchmark knows, in table order; ratios are against DEEPSPEED_ADAMW."""

LR, EPS, BETAS = 1e-3, 1e-6, (0.9, 0.999)  # the same for every optimizer; weight decay 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One training run: which optimizer, at which ZeRO stage, in which precision."""

    optimizer: str
    stage: int
    dtype: str = "fp32"


@dataclass(frozen=True)
class RunSettings:
    """What every case of one launch shares."""

    config: LlamaConfig
    device: str = "cpu"
    warmup: int = 0
    steps: int = 3
    batch: int = 1  # micro batch per rank
    seq: int = 64
    seed: int = 0
    fused_adam: bool = False  # DeepSpeed's FusedAdam (CUDA) instead of torch.optim.AdamW


# -- DeepSpeed configs and engines -------------------------------------------------------------


def import_deepspeed(device: str) -> Any:
    """``deepspeed``, with its accelerator chosen for ``device`` before the first import."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    import deepspeed  # noqa: PLC0415  (5 s; only when a case runs)

    # Skip the JIT build of DeepSpeed's shared-memory CPU op (minutes); gloo moves the same bytes.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(case: Case, settings: RunSettings, world_size: int) -> dict[str, Any]:
    """The config of ``case``: checked for our client optimizer, or with DeepSpeed's AdamW."""
    from gnlorp_dist.integrations.deepspeed import check_deepspeed_config  # noqa: PLC0415

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": settings.batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": settings.batch * world_size,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the optimizers must match
        "bf16": {"enabled": case.dtype == "bf16"},
        "zero_optimization": {"stage": case.stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if case.optimizer != DEEPSPEED_ADAMW:
        return check_deepspeed_config(config)
    params: dict[str, Any] = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0}
    if not settings.fused_adam:
        params["torch_adam"] = True  # FusedAdam is a CUDA kernel
    config["optimizer"] = {"type": "AdamW", "params": params}
    return config


def _build(case: Case, settings: RunSettings) -> tuple[torch.nn.Module, Any, int]:
    """``(model on the device, client optimizer or None, projected matrix count)``."""
    model = build_model(settings.config, dtype=torch.float32, seed=settings.seed)
    if case.optimizer == DEEPSPEED_ADAMW:
        return model.to(settings.device), None, 0
    apply_weight_norm(model)
    model.to(settings.device)
    spec = recipe_for_config(settings.config)
    groups = projected_param_groups(
        model, rank=spec.rank, update_proj_gap=spec.update_proj_gap, scale=spec.scale
    )
    projected = sum(len(g["params"]) for g in groups if "rank" in g)
    bits = 8 if case.optimizer == OURS_8BIT else 32
    optimizer = GradNormLoRPAdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, bits=bits)
    return model, optimizer, projected


def _initialize(deepspeed: Any, model: torch.nn.Module, client: Any, config: dict, fused: bool):
    """``deepspeed.initialize`` with our client optimizer, or with the config's AdamW."""
    if client is not None:
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
        return engine
    try:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=list(model.parameters()), config=config
        )
    except Exception as err:
        if not fused:
            raise
        # FusedAdam is JIT-compiled on first use (needs nvcc and ninja) unless DeepSpeed was
        # installed with DS_BUILD_FUSED_ADAM=1.
        raise RuntimeError(
            f"DeepSpeed's FusedAdam could not be set up ({type(err).__name__}: {err}); "
            "rerun with --ds-torch-adam to compare against torch.optim.AdamW instead"
        ) from err
    return engine


# -- exact byte counts ---------------------------------------------------------------------------


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in the optimizer's per-parameter states (``state``), and of those
    the projection bases (``proj``) and Adam's moments (``moments``: ``exp_avg*`` keys, with
    8-bit codes' block scales).

    Values that are not dicts (none today) and Python numbers (our step counters, our ZeRO
    layout record) hold no tensor memory and count 0.
    """
    counts = optimizer_state_bytes(optimizer)
    return {"state": counts["total"], "proj": counts["projection"], "moments": counts["moments"]}


def master_partitions(engine_optimizer: Any) -> list[torch.Tensor]:
    """DeepSpeed's flat fp32 master partitions on this rank ([] where there are none)."""
    for attribute in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        partitions = getattr(engine_optimizer, attribute, None)
        if partitions is not None:
            return list(partitions)
    return []


def stepped_optimizer(engine: Any, client: Any) -> torch.optim.Optimizer:
    """The optimizer whose state holds the moments: ours, or the torch optimizer that DeepSpeed
    built from its config (under a ZeRO wrapper at stages 1-3, itself at stage 0 in fp32)."""
    if client is not None:
        return client
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def model_numel(model: torch.nn.Module) -> int:
    """Elements of the whole model (ZeRO-3 leaves each parameter empty outside a gather)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# -- one case on one rank --------------------------------------------------------------------


def _batch(step: int, rank: int, settings: RunSettings, world_size: int) -> torch.Tensor:
    """This rank's slice of a global random-token batch (same data for every optimizer)."""
    gen = torch.Generator().manual_seed(settings.seed * 100_003 + step)
    vocab = settings.config.vocab_size
    ids = torch.randint(0, vocab, (settings.batch * world_size, settings.seq), generator=gen)
    return ids.chunk(world_size)[rank].to(settings.device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _train(engine: Any, settings: RunSettings, rank: int, world_size: int):
    """``(losses of every step, seconds of each timed step)``."""
    losses: list[float] = []
    step_seconds: list[float] = []
    for step in range(settings.warmup + settings.steps):
        ids = _batch(step, rank, settings, world_size)
        _sync(settings.device)
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        _sync(settings.device)
        if step >= settings.warmup:
            step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return losses, step_seconds


def _counts(engine: Any, client: Any, settings: RunSettings) -> dict[str, Any]:
    """The exact bytes and SVD counts of a trained case on this rank."""
    optimizer = stepped_optimizer(engine, client)
    counts = state_bytes(optimizer)
    masters = master_partitions(engine.optimizer)
    spec = recipe_for_config(settings.config)
    total_steps = settings.warmup + settings.steps
    refreshes = client.refresh_count if client is not None else 0
    refresh_steps = math.ceil(total_steps / spec.update_proj_gap) if client is not None else 0
    return {
        "engine_optimizer": type(engine.optimizer).__name__,
        "stepped_optimizer": type(optimizer).__name__,
        "state_bytes": counts["state"],
        "proj_bytes": counts["proj"],
        "moment_bytes": counts["moments"],
        "master_bytes": sum(t.numel() * 4 for t in masters),
        "master_dtypes": sorted({str(t.dtype) for t in masters}),
        "flat_state_groups": sum(1 for s in optimizer.state.values() if isinstance(s, dict)),
        "refreshes": refreshes,
        "refresh_steps": refresh_steps,
        "svds_per_refresh": refreshes / refresh_steps if refresh_steps else 0.0,
    }


def run_case(case: Case, settings: RunSettings, rank: int, world_size: int) -> dict[str, Any]:
    """Train ``case`` for warmup + steps steps on this rank (torch.distributed already set up)
    and return this rank's exact bytes, SVD count, peak memory (CUDA) and timings."""
    deepspeed = import_deepspeed(settings.device)
    cuda = settings.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # Peak above what this process held before the run: an earlier run's leftovers (DeepSpeed
    # keeps a few globals) must not count against this one.
    allocated_before = torch.cuda.memory_allocated() if cuda else 0
    model, client, projected = _build(case, settings)
    config = deepspeed_config(case, settings, world_size)
    engine = _initialize(deepspeed, model, client, config, settings.fused_adam)
    losses, step_seconds = _train(engine, settings, rank, world_size)
    timed = sum(step_seconds)
    result = {
        "optimizer": case.optimizer, "stage": case.stage, "dtype": case.dtype, "rank": rank,
        "world_size": world_size, "model_numel": model_numel(model),
        "projected_matrices": projected, **_counts(engine, client, settings),
        "losses": losses, "step_seconds": step_seconds,
        "tokens_per_s": settings.batch * settings.seq * world_size * len(step_seconds) / timed
        if timed
        else None,
        "peak_bytes": torch.cuda.max_memory_allocated() - allocated_before if cuda else None,
        "allocated_before_bytes": allocated_before if cuda else None,
    }  # fmt: skip
    del engine, client, model
    gc.collect()
    return result


# -- launching ranks ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def distributed(rank: int, world_size: int, init_file: str, device: str) -> Iterator[None]:
    """torch.distributed for this rank through ``deepspeed.init_distributed`` (gloo on the CPU,
    nccl on a GPU), with the variables DeepSpeed reads; both undone afterwards."""
    deepspeed = import_deepspeed(device)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank) if device == "cpu" else "0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()),
    )
    if device == "cuda":
        torch.cuda.set_device(0)
    deepspeed.init_distributed(
        dist_backend="nccl" if device == "cuda" else "gloo",
        auto_mpi_discovery=False,
        verbose=False,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
    )
    try:
        yield
    finally:
        leave_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_cases(
    cases: Sequence[Case], settings: RunSettings, rank: int, world_size: int, init_file: str
) -> list[dict[str, Any]]:
    """Every case, one after the other, on this rank of one process group."""
    with distributed(rank, world_size, init_file, settings.device):
        return [run_case(case, settings, rank, world_size) for case in cases]


def _forked_rank(
    rank: int, world_size: int, cases: Sequence[Case], settings: RunSettings, out_dir: str
) -> None:
    # Ranks oversubscribe the cores: one thread each keeps them from fighting over them.
    torch.set_num_threads(1)
    results = run_cases(cases, settings, rank, world_size, str(Path(out_dir) / "rendezvous"))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def launch(
    cases: Sequence[Case], settings: RunSettings, world_size: int, in_process: bool = False
) -> list[list[dict[str, Any]]]:
    """Results indexed ``[rank][case]``: ``world_size`` forked gloo ranks, or (world size 1 only)
    this process, as the GPU mode and the unit test run it."""
    with tempfile.TemporaryDirectory() as tmp:
        if in_process:
            if world_size != 1:
                raise ValueError(f"in_process needs world_size 1, not {world_size}")
            return [run_cases(cases, settings, 0, 1, str(Path(tmp) / "rendezvous"))]
        mp.start_processes(
            _forked_rank,
            args=(world_size, list(cases), settings, tmp),
            nprocs=world_size,
            start_method="fork",
        )
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
