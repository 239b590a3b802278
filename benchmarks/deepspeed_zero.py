"""GradNormLoRPAdamW under DeepSpeed ZeRO: exact per-rank bytes (CPU) and peak memory + speed (GPU).

CPU mode (default): for ZeRO stages 0-3 and 1, 2 and 4 forked gloo ranks, a LLaMA (default
``llama_60m``, fp32; rank, T and alpha from the model's recipe) trains a few steps under
``deepspeed.initialize`` with, as optimizer,

- ``gradnormlorp``: :class:`gnlorp_dist.GradNormLoRPAdamW` as DeepSpeed's client optimizer on the
  weight-normalised model (``gradnormlorp-8bit``: the same at ``bits=8``);
- ``deepspeed-adamw``: DeepSpeed's own optimizer from the config block ``"optimizer": {"type":
  "AdamW", ...}`` (``torch_adam``: ``torch.optim.AdamW`` over DeepSpeed's flat partitions; fused
  kernels need a GPU) on the plain model, no client optimizer: the usual ZeRO + AdamW baseline.

Per rank it reports exact bytes counted from the live objects after the last step:

- ``state``: every tensor in the optimizer's state (moments, 8-bit codes and scales, projection
  bases ``proj``, AdamW's 4-byte ``step`` tensors). For ours this is the client optimizer's
  ``state``; for DeepSpeed's AdamW it is the state of the torch optimizer the ZeRO wrapper holds
  (``engine.optimizer.optimizer``), keyed by the flat fp32 partitions;
- ``master``: DeepSpeed's fp32 master partition (``single_partition_of_fp32_groups`` at ZeRO 1/2,
  ``fp32_partitioned_groups_flat`` at ZeRO 3; at ZeRO 0 in fp32 the model's weights are the
  masters and no copy exists: 0);
- the SVDs each rank computed per subspace refresh (``optimizer.refresh_count``: each matrix's
  subspace is computed by one owner rank only).

The script asserts that at stages 1-3 every rank's state and master bytes shrink as ranks are
added, and that DeepSpeed's AdamW state is exactly two fp32 moments of its master partition plus
one 4-byte step tensor per flat group.

GPU mode (``--device cuda``): ZeRO-2 bf16 on ONE GPU (world size 1, in this process, via
``deepspeed.init_distributed``), ``--warmup`` untimed then ``--steps`` timed steps of ``--batch``
x ``--seq`` tokens: the peak memory of each run (``torch.cuda.max_memory_allocated`` above what was
allocated before it started) and tokens/s, for ``gradnormlorp`` at 32 and 8 bits and DeepSpeed's
own Adam (FusedAdam in AdamW mode; ``--ds-torch-adam`` for ``torch.optim.AdamW``), ratios against
DeepSpeed's. ``--device cpu --single-rank-compare`` runs the same comparison on the CPU (no peak
memory there), so the code path is exercised without a GPU.

Usage::

    python -m benchmarks.deepspeed_zero                       # CPU ZeRO table, ~16 minutes
    python -m benchmarks.deepspeed_zero --device cuda --model llama_60m --batch 8 --seq 256
    python -m benchmarks.deepspeed_zero --device cpu --single-rank-compare --model llama_nano
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.bench.harness import RESULTS_DIR, environment, format_table, write_json
from gnlorp_dist.memory.bytes import optimizer_state_bytes
from gnlorp_dist.models import build_model, llama_config, recipe_for_config

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
    if client is None:
        try:
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=list(model.parameters()), config=config
            )
        except Exception as err:
            if not settings.fused_adam:
                raise
            # FusedAdam is JIT-compiled on first use (needs nvcc and ninja) unless DeepSpeed was
            # installed with DS_BUILD_FUSED_ADAM=1.
            raise RuntimeError(
                f"DeepSpeed's FusedAdam could not be set up ({type(err).__name__}: {err}); "
                "rerun with --ds-torch-adam to compare against torch.optim.AdamW instead"
            ) from err
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)

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

    optimizer = stepped_optimizer(engine, client)
    counts = state_bytes(optimizer)
    masters = master_partitions(engine.optimizer)
    spec = recipe_for_config(settings.config)
    total_steps = settings.warmup + settings.steps
    refreshes = client.refresh_count if client is not None else 0
    refresh_steps = math.ceil(total_steps / spec.update_proj_gap) if client is not None else 0
    timed = sum(step_seconds)
    result = {
        "optimizer": case.optimizer,
        "stage": case.stage,
        "dtype": case.dtype,
        "rank": rank,
        "world_size": world_size,
        "engine_optimizer": type(engine.optimizer).__name__,
        "stepped_optimizer": type(optimizer).__name__,
        "model_numel": model_numel(model),
        "projected_matrices": projected,
        "state_bytes": counts["state"],
        "proj_bytes": counts["proj"],
        "moment_bytes": counts["moments"],
        "master_bytes": sum(t.numel() * 4 for t in masters),
        "master_dtypes": sorted({str(t.dtype) for t in masters}),
        "flat_state_groups": sum(1 for s in optimizer.state.values() if isinstance(s, dict)),
        "refreshes": refreshes,
        "refresh_steps": refresh_steps,
        "svds_per_refresh": refreshes / refresh_steps if refresh_steps else 0.0,
        "losses": losses,
        "step_seconds": step_seconds,
        "tokens_per_s": settings.batch * settings.seq * world_size * len(step_seconds) / timed
        if timed
        else None,
        "peak_bytes": torch.cuda.max_memory_allocated() - allocated_before if cuda else None,
        "allocated_before_bytes": allocated_before if cuda else None,
    }
    del engine, optimizer, client, model, masters
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
        if dist.is_initialized():
            dist.destroy_process_group()
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


# -- reports -----------------------------------------------------------------------------------


def summarise(per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from the same case on every rank."""
    first = per_rank[0]
    states = [r["state_bytes"] for r in per_rank]
    masters = [r["master_bytes"] for r in per_rank]
    times = [max(r["step_seconds"]) if r["step_seconds"] else 0.0 for r in per_rank]
    return {
        "optimizer": first["optimizer"],
        "stage": first["stage"],
        "dtype": first["dtype"],
        "world_size": first["world_size"],
        "engine_optimizer": first["engine_optimizer"],
        "stepped_optimizer": first["stepped_optimizer"],
        "model_numel": first["model_numel"],
        "projected_matrices": first["projected_matrices"],
        "state_bytes_per_rank": states,
        "state_bytes_max": max(states),
        "state_bytes_min": min(states),
        "proj_bytes_per_rank": [r["proj_bytes"] for r in per_rank],
        "moment_bytes_per_rank": [r["moment_bytes"] for r in per_rank],
        "master_bytes_per_rank": masters,
        "master_bytes_max": max(masters),
        "master_bytes_min": min(masters),
        "flat_state_groups_per_rank": [r["flat_state_groups"] for r in per_rank],
        "svds_per_refresh_per_rank": [r["svds_per_refresh"] for r in per_rank],
        "svds_per_refresh_total": sum(r["svds_per_refresh"] for r in per_rank),
        "step_seconds_max_rank": max(times),
        "losses_rank0": first["losses"],
        "tokens_per_s": first["tokens_per_s"],
        "peak_bytes_per_rank": [r["peak_bytes"] for r in per_rank],
        "allocated_before_bytes_per_rank": [r["allocated_before_bytes"] for r in per_rank],
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per-rank state over the same optimizer and stage at 1 rank, and over DeepSpeed's AdamW at
    the same stage and world size (both measured in this run; None where it was not)."""
    index = {(r["optimizer"], r["stage"], r["world_size"]): r for r in rows}
    for row in rows:
        one = index.get((row["optimizer"], row["stage"], 1))
        ds = index.get((DEEPSPEED_ADAMW, row["stage"], row["world_size"]))
        row["state_max_over_1rank"] = (
            row["state_bytes_max"] / one["state_bytes_max"] if one else None
        )
        row["state_max_over_deepspeed_adamw"] = (
            row["state_bytes_max"] / ds["state_bytes_max"] if ds else None
        )


def check_invariants(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the numbers must satisfy; raise AssertionError naming the row that breaks it."""
    checks: list[str] = []
    for row in rows:
        if row["optimizer"] == DEEPSPEED_ADAMW and row["stage"] >= 1:
            # exp_avg + exp_avg_sq in fp32 of the master partition's shape: DeepSpeed's AdamW
            # state lives on the flat partitions, not on the model's parameters.
            for moments, master in zip(row["moment_bytes_per_rank"], row["master_bytes_per_rank"]):
                assert moments == 2 * master, row
    checks.append("DeepSpeed AdamW moments = 2 x its fp32 master partition, on every rank")
    worlds = sorted({r["world_size"] for r in rows})
    for optimizer in {r["optimizer"] for r in rows}:
        for stage in (1, 2, 3):
            series = [
                r
                for w in worlds
                for r in rows
                if r["world_size"] == w and r["optimizer"] == optimizer and r["stage"] == stage
            ]
            for small, large in zip(series, series[1:]):
                for key in ("state_bytes_max", "master_bytes_max"):
                    assert large[key] < small[key], (optimizer, stage, key, small, large)
    if len(worlds) > 1:
        checks.append(f"stages 1-3: max per-rank state and master bytes shrink over ranks {worlds}")
    for row in rows:
        if row["optimizer"] != DEEPSPEED_ADAMW:
            # Each subspace is computed once in the whole job, whichever rank owns it.
            assert row["svds_per_refresh_total"] == row["projected_matrices"], row
    checks.append("ours: SVDs per refresh summed over ranks = projected matrices")
    return checks


def _b(value: int) -> str:
    return f"{value:,}"


def _ratio(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def zero_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = [
        "stage",
        "ranks",
        "optimizer",
        "state B/rank max",
        "state B/rank min",
        "x 1 rank",
        "x ds-adamw",
        "fp32 master B/rank max",
        "master min",
        "SVDs/refresh/rank",
    ]
    body = []
    for r in rows:
        svds = r["svds_per_refresh_per_rank"]
        body.append(
            [
                r["stage"],
                r["world_size"],
                r["optimizer"],
                _b(r["state_bytes_max"]),
                _b(r["state_bytes_min"]),
                _ratio(r["state_max_over_1rank"]),
                _ratio(r["state_max_over_deepspeed_adamw"]),
                _b(r["master_bytes_max"]),
                _b(r["master_bytes_min"]),
                "-" if r["optimizer"] == DEEPSPEED_ADAMW else "/".join(f"{s:g}" for s in svds),
            ]
        )
    return format_table(headers, body)


def compare_table(rows: Sequence[dict[str, Any]]) -> str:
    ds = next((r for r in rows if r["optimizer"] == DEEPSPEED_ADAMW), None)
    headers = [
        "optimizer",
        "stepped by",
        "state B",
        "x ds",
        "master B",
        "peak B",
        "x ds",
        "tokens/s",
        "x ds",
    ]
    body = []
    for r in rows:
        peak = r["peak_bytes_per_rank"][0]
        ds_peak = ds["peak_bytes_per_rank"][0] if ds else None
        body.append(
            [
                r["optimizer"],
                r["stepped_optimizer"],
                _b(r["state_bytes_max"]),
                _ratio(r["state_bytes_max"] / ds["state_bytes_max"] if ds else None),
                _b(r["master_bytes_max"]),
                "-" if peak is None else _b(peak),
                _ratio(peak / ds_peak if peak is not None and ds_peak else None),
                f"{r['tokens_per_s']:.0f}",
                _ratio(r["tokens_per_s"] / ds["tokens_per_s"] if ds else None),
            ]
        )
    return format_table(headers, body)


def _params(rows: Sequence[dict[str, Any]]) -> str:
    """Parameter counts of the models trained: plain (DeepSpeed's AdamW) and weight-normalised
    (ours: one magnitude more per output row of each projected layer)."""
    counts = sorted({r["model_numel"] for r in rows})
    label = "params (plain / weight-normalised)" if len(counts) == 2 else "params"
    return " / ".join(f"{c:,}" for c in counts) + " " + label


# -- the two modes -----------------------------------------------------------------------------


def zero_mode(args: argparse.Namespace, settings: RunSettings) -> dict[str, Any]:
    cases = [Case(o, s) for s in args.stages for o in args.optimizers]
    rows: list[dict[str, Any]] = []
    for world_size in args.worlds:
        started = time.perf_counter()
        results = launch(cases, settings, world_size)
        print(f"{world_size} rank(s): {time.perf_counter() - started:.0f} s", flush=True)
        rows += [summarise([results[r][i] for r in range(world_size)]) for i in range(len(cases))]
    rows.sort(key=lambda r: (r["stage"], r["world_size"], OPTIMIZERS.index(r["optimizer"])))
    add_ratios(rows)
    checks = check_invariants(rows)
    spec = recipe_for_config(settings.config)
    print(
        f"\n{args.model} ({_params(rows)}, fp32), ZeRO stages "
        f"{args.stages} over {args.worlds} gloo ranks, {settings.steps} steps of "
        f"{settings.batch} x {settings.seq} tokens per rank; rank {spec.rank}, T="
        f"{spec.update_proj_gap}. Exact bytes per rank after the last step:"
    )
    print(zero_table(rows))
    print("\nchecked: " + "; ".join(checks))
    return {"mode": "zero", "rows": rows, "checks": checks}


def compare_mode(args: argparse.Namespace, settings: RunSettings) -> dict[str, Any]:
    cases = [Case(o, args.stage, args.dtype) for o in args.optimizers]
    results = launch(cases, settings, 1, in_process=True)
    rows = [summarise([r]) for r in results[0]]
    add_ratios(rows)
    checks = check_invariants(rows)
    print(
        f"\n{args.model} ({_params(rows)}), ZeRO-{args.stage} {args.dtype} on "
        f"one {settings.device.upper()} rank, {settings.steps} timed steps after {settings.warmup}"
        f" warm-up, {settings.batch} x {settings.seq} tokens. peak B = max_memory_allocated above "
        "the allocation before the run (CUDA only):"
    )
    print(compare_table(rows))
    print("\nchecked: " + "; ".join(checks))
    return {"mode": "single-rank-compare", "rows": rows, "checks": checks}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--single-rank-compare",
        action="store_true",
        help="the GPU mode's comparison (one rank, in this process); implied by --device cuda",
    )
    parser.add_argument("--model", default="llama_60m", help="a named LLaMA or a config path")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=None)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage of the compare mode")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="micro batch per rank")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (in-process)")
    parser.add_argument(
        "--ds-torch-adam",
        action="store_true",
        help="on CUDA, DeepSpeed's AdamW as torch.optim.AdamW instead of FusedAdam",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    compare = args.single_rank_compare or args.device == "cuda"
    args.mode = "compare" if compare else "zero"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). On a CPU, "
            "run the ZeRO byte table (no --device) or --device cpu --single-rank-compare instead."
        )
    # Defaults per mode: the ZeRO table counts bytes (few short fp32 steps are enough); the
    # comparison times steps (warm-up first, bf16 as on a GPU).
    defaults = {
        "zero": {"steps": 3, "warmup": 0, "batch": 1, "seq": 64, "dtype": "fp32"},
        "compare": {"steps": 20, "warmup": 5, "batch": 8, "seq": 256, "dtype": "bf16"},
    }[args.mode]
    if args.device == "cpu" and compare:
        defaults.update(steps=3, warmup=1, batch=1, seq=64)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mode == "zero" and args.dtype != "fp32":
        parser.error("the ZeRO table runs in fp32 (bf16 adds DeepSpeed's bf16 wrappers)")
    if args.optimizers is None:
        args.optimizers = [OURS, OURS_8BIT, DEEPSPEED_ADAMW]
    if args.json is None:
        name = "deepspeed_zero" if args.mode == "zero" else f"deepspeed_zero_{args.device}"
        args.json = RESULTS_DIR / f"{name}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.mode == "zero" else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    import_deepspeed(args.device)
    settings = RunSettings(
        config=llama_config(args.model),
        device=args.device,
        warmup=args.warmup,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        fused_adam=args.device == "cuda" and not args.ds_torch_adam,
    )
    started = time.perf_counter()
    run: Callable[[argparse.Namespace, RunSettings], dict[str, Any]]
    run = zero_mode if args.mode == "zero" else compare_mode
    report = run(args, settings)
    report.update(
        benchmark="deepspeed_zero",
        model=args.model,
        settings={k: v for k, v in asdict(settings).items() if k != "config"},
        recipe=asdict(recipe_for_config(settings.config)),
        deepspeed=sys.modules["deepspeed"].__version__,
        environment=environment(),
        runtime_s=time.perf_counter() - started,
    )
    path = write_json(args.json, report)
    print(f"\n{report['runtime_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
