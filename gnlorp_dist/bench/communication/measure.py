"""One measured launch: a scheme on a model over N forked gloo ranks on this machine, each
measured step in its own window.

Two counts per window (``GLOO_SOCKET_IFNAME=lo``, set by the caller):

1. the loopback byte counter: rank 0 reads ``lo``'s transmitted bytes in ``/proc/net/dev``
   (:func:`loopback_tx_bytes`) between barriers before and after each measured step, so
   start-up (DDP's and ``broadcast_parameters``' initial broadcasts, DeepSpeed's set-up) and the
   end of the job are outside the window. Two barriers sit inside each window; their bytes
   (measured on empty windows) are subtracted later. On loopback every byte any rank sends is
   counted once: the figure is the job's total bytes sent per step;
2. the payload of every collective, per rank, by kind, from the three counters of
   :mod:`gnlorp_dist.distributed.counting` (``torch.distributed``'s functions, DDP's comm hook,
   our communicator).
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.bench.communication import zero2
from gnlorp_dist.bench.communication.schemes import (
    DDP_ADAMW,
    OPS,
    OURS_DDP,
    OURS_FULL,
    OURS_LOW_RANK,
    SCHEMES,
    ZERO2_ADAMW,
    model_config,
    recipe,
)
from gnlorp_dist.bench.harness import DTYPES
from gnlorp_dist.distributed import broadcast_parameters
from gnlorp_dist.distributed.counting import CountingCommunicator, DistCounter, counted_ddp
from gnlorp_dist.distributed.rendezvous import barrier, end_forked_rank, join_file_group
from gnlorp_dist.models import build_model

Step = Callable[[torch.Tensor], float]
"""One training step on a batch of token ids; returns the loss."""


@dataclass(frozen=True)
class RunSettings:
    """One launch: ``method`` (a scheme of :data:`SCHEMES`) on ``model`` over ``world`` ranks."""

    model: str
    method: str
    world: int
    batch: int = 1  # per rank
    seq: int = 32
    warmup: int = 2
    steps: int = 3
    run_gap: int = 3  # projected groups refresh at steps 0, run_gap, 2 run_gap, ...
    empty_windows: int = 3  # windows with no step: the barriers' own bytes
    seed: int = 0
    timeout_s: float = 600.0
    dtype: str = "fp32"  # the weights' (and so the gradients') dtype


def loopback_tx_bytes() -> int:
    """Bytes sent on ``lo`` so far in this network namespace (``/proc/net/dev``)."""
    with open("/proc/net/dev") as handle:
        for line in handle:
            name, _, data = line.partition(":")
            if name.strip() == "lo":
                return int(data.split()[8])  # receive: 8 fields, then transmit bytes
    raise RuntimeError("no 'lo' interface in /proc/net/dev")


def supports_gradient_reduction() -> bool:
    """Whether the installed optimizer takes ``gradient_reduction`` (issue #13's API)."""
    return "gradient_reduction" in inspect.signature(GradNormLoRPAdamW.__init__).parameters


def sync_read(rank: int) -> int:
    """Every rank done with what came before; rank 0 reads the counter; nobody starts the next
    thing before it has (the second barrier)."""
    barrier()
    value = loopback_tx_bytes() if rank == 0 else 0
    barrier()
    return value


def _global_ids(step: int, settings: RunSettings, vocab: int) -> torch.Tensor:
    """Every rank's token ids of ``step`` (the same on every rank: one seed)."""
    gen = torch.Generator().manual_seed(settings.seed * 100_003 + step)
    return torch.randint(0, vocab, (settings.batch * settings.world, settings.seq), generator=gen)


def _step_ids(step: int, rank: int, settings: RunSettings, vocab: int) -> torch.Tensor:
    return _global_ids(step, settings, vocab).chunk(settings.world)[rank]


def _ours_optimizer(model: torch.nn.Module, settings: RunSettings, comm: Any, mode: str) -> Any:
    """GradNormLoRPAdamW at the model's rank with the in-run refresh gap; ``mode`` "none"
    (DDP-averaged gradients), "full" or "low_rank"."""
    rank, _ = recipe(settings.model)
    groups = projected_param_groups(model, rank=rank, update_proj_gap=settings.run_gap, scale=0.25)
    kwargs: dict[str, Any] = {"lr": 1e-3, "eps": 1e-6, "weight_decay": 0.0, "communicator": comm}
    if supports_gradient_reduction():
        kwargs["gradient_reduction"] = mode
    elif mode == "full":
        kwargs["reduce_gradients"] = True  # the same mode under its earlier name
    elif mode != "none":
        raise RuntimeError("this gnlorp_dist has no gradient_reduction='low_rank' yet")
    return GradNormLoRPAdamW(groups, **kwargs)


def _train_step(forward: torch.nn.Module, optimizer: Any) -> Step:
    def step(ids: torch.Tensor) -> float:
        loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _ours(model: torch.nn.Module, settings: RunSettings, counters: dict[str, Any]) -> Step:
    """GradNormLoRPAdamW on the weight-normalised ``model``: in DDP (``ours-ddp``) or reducing
    its own gradients (``ours-full``, ``ours-lowrank``), through a counting communicator."""
    apply_weight_norm(model)
    comm = CountingCommunicator()
    counters["comm"] = comm
    if settings.method == OURS_DDP:
        optimizer = _ours_optimizer(model, settings, comm, "none")
        forward: torch.nn.Module = counted_ddp(model, counters["hook"])
    elif settings.method in (OURS_FULL, OURS_LOW_RANK):
        broadcast_parameters(model, comm)  # what DDP does at construction; before the window
        mode = "full" if settings.method == OURS_FULL else "low_rank"
        optimizer = _ours_optimizer(model, settings, comm, mode)
        forward = model
    else:
        raise ValueError(f"method {settings.method!r} is not known; use one of {SCHEMES}")
    counters["optimizer"] = optimizer
    return _train_step(forward, optimizer)


def build_scheme(settings: RunSettings) -> tuple[Step, dict[str, Any]]:
    """The scheme's model and optimizer on this rank (process group up): a train-step function
    and the live counters it updates (``hook``: DDP's buckets, ``comm``: our communicator,
    ``optimizer``: ours, for its refresh count; ``zero_flags``: DeepSpeed's path)."""
    config = model_config(settings.model)
    model = build_model(config, dtype=DTYPES[settings.dtype], seed=settings.seed)
    counters: dict[str, Any] = {"hook": {}, "comm": None, "optimizer": None}
    if settings.method == DDP_ADAMW:
        wrapped = counted_ddp(model, counters["hook"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
        return _train_step(wrapped, optimizer), counters
    if settings.method == ZERO2_ADAMW:
        step, counters["zero_flags"] = zero2.adamw_step(
            model, config, batch=settings.batch, seq=settings.seq, world_size=settings.world
        )
        return step, counters
    return _ours(model, settings, counters), counters


def _empty_windows(settings: RunSettings, rank: int) -> list[int]:
    """Loopback bytes of windows holding no step: the barriers' own."""
    empty = []
    for _ in range(settings.empty_windows):
        before = sync_read(rank)
        empty.append(sync_read(rank) - before)
    return empty


def _measured_step(
    step_fn: Step, ids: torch.Tensor, rank: int, counters: dict[str, Any], dist_counter: DistCounter
) -> dict[str, Any]:
    """One step in its own window: loopback bytes and every counter's difference."""
    optimizer, comm, hook = counters["optimizer"], counters["comm"], counters["hook"]
    d0, c0, h0 = dist_counter.snapshot(), comm.snapshot() if comm else {}, dict(hook)
    r0 = optimizer.refresh_count if optimizer is not None else 0
    before = sync_read(rank)
    loss = step_fn(ids)
    after = sync_read(rank)
    d1, c1 = dist_counter.snapshot(), comm.snapshot() if comm else {}
    return {
        "lo_bytes": after - before,
        "dist": {op: d1[op] - d0[op] for op in OPS},
        "comm": {op: c1.get(op, 0) - c0.get(op, 0) for op in OPS},
        "hook": {k: hook.get(k, 0) - h0.get(k, 0) for k in ("all_reduce", "buckets")},
        "refreshes": (optimizer.refresh_count - r0) if optimizer is not None else 0,
        "loss": loss,
    }


def measure(settings: RunSettings, rank: int, dist_counter: DistCounter) -> dict[str, Any]:
    """This rank's records: the empty windows, then one record per measured step."""
    step_fn, counters = build_scheme(settings)
    vocab = model_config(settings.model).vocab_size
    empty = _empty_windows(settings, rank)
    records = []
    for step in range(settings.warmup + settings.steps):
        ids = _step_ids(step, rank, settings, vocab)
        if step < settings.warmup:
            step_fn(ids)
            continue
        record = _measured_step(step_fn, ids, rank, counters, dist_counter)
        # The embedding rows some rank's batch touched: the rows the optimizer sums onto owners
        # (gnlorp_dist.optim.sparse_rows), for the payload arithmetic. A sequence's last token
        # predicts nothing (labels shift), so its row gets no gradient from that position.
        touched = int(_global_ids(step, settings, vocab)[:, :-1].unique().numel())
        records.append({"step": step, "touched_rows": touched, **record})
    return {
        "rank": rank,
        "empty_windows_lo": empty,
        "records": records,
        "zero_flags": counters.get("zero_flags"),
    }


def _rank_main(rank: int, settings: RunSettings, out_dir: str) -> None:
    torch.set_num_threads(1)  # ranks oversubscribe the cores; one thread each
    counter = DistCounter().install()  # before any backend keeps references to the functions
    init_file = str(Path(out_dir) / "rendezvous")
    if settings.method == ZERO2_ADAMW:
        with zero2.process_group(rank, settings.world, init_file):
            result = measure(settings, rank, counter)
    else:
        # What torchrun exports: our default communicator reads WORLD_SIZE.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(settings.world), LOCAL_RANK=str(rank))
        join_file_group(rank, settings.world, init_file)
        result = measure(settings, rank, counter)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    end_forked_rank()


def launch_ranks(target: Callable, args: tuple, world: int, timeout_s: float) -> str:
    """``target(rank, *args)`` on ``world`` forked ranks; raises RuntimeError on a failure."""
    context = mp.start_processes(target, args=args, nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still running after {timeout_s:.0f} s")
    except Exception as err:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else type(err).__name__) from err
    return "ok"


def launch_run(settings: RunSettings) -> list[dict[str, Any]]:
    """Every rank's :func:`measure` result for one launch of ``settings``."""
    with tempfile.TemporaryDirectory() as tmp:
        launch_ranks(_rank_main, (settings, tmp), settings.world, settings.timeout_s)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(settings.world)]
