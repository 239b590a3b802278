"""Does overlapping the low-rank sync pay? Step time of each way, against DDP + AdamW.

Forked gloo ranks (``RANK``/``WORLD_SIZE`` set as torchrun sets them) train the same LLaMA:

- ``ddp-adamw``: the plain model in DDP with ``torch.optim.AdamW`` (the baseline);
- ``after``: the weight-normalised model, ``GradNormLoRPAdamW(gradient_reduction="low_rank")``,
  not in DDP, every reduce inside ``step()``;
- ``overlap``: each backward wrapped in ``optimizer.reducing_in_backward()`` (what gnlorp-train
  does): the bucketed sums onto owners start as soon as their gradients are final;
- ``overlap+next-fwd``: also ``optimizer.applying_directions_in_forward(model)``: each matrix's
  direction is applied just before its module's next forward, so the broadcasts overlap it.

Our three must end with bitwise the same weights (printed); the table gives the median
whole-step time (forward, backward, step) over the timed steps, no refresh among them, and the
ratios to ``after`` and to ``ddp-adamw``, per world size.

    python -m benchmarks.overlap                     # llama_60m, 2 and 4 ranks, a few minutes
    python -m benchmarks.overlap --model llama_nano --steps 6 --worlds 2
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.bench.harness import RESULTS_DIR, environment, format_table, write_json
from gnlorp_dist.distributed import ProcessGroupCommunicator, broadcast_parameters
from gnlorp_dist.distributed.rendezvous import barrier, join_file_group, leave_process_group
from gnlorp_dist.models import build_model, llama_config
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

MODES = ("ddp-adamw", "after", "overlap", "overlap+next-fwd")
OURS = MODES[1:]


@dataclass(frozen=True, kw_only=True)
class OverlapConfig:
    """The model both modes train on two gloo ranks, and how long."""

    model: str = option("llama_60m", metavar="NAME")
    """A named LLaMA shape (llama_nano, llama_micro, llama_60m ...)."""
    rank: int = 128
    """Projection rank."""
    batch: int = 1
    """Sequences per rank and step."""
    seq: int = 64
    """Tokens per sequence."""
    warmup: int = 2
    """Untimed steps first (step 0 refreshes the subspaces)."""
    steps: int = 8
    """Timed steps per mode."""
    worlds: tuple[int, ...] = option((2, 4), metavar="N")
    """Ranks per launch (forked gloo processes on this machine; more than the cores
    oversubscribe them)."""
    json: str = option(str(RESULTS_DIR / "overlap.json"), metavar="PATH")
    """Where to write the results."""


def _rank(rank: int, world: int, init: str, args: OverlapConfig, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    join_file_group(rank, world, init)
    comm = ProcessGroupCommunicator()
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        model, optimizer, forward = _build(mode, args, comm)
        vocab = model.config.vocab_size
        times = []
        for step in range(args.warmup + args.steps):  # step 0 is the refresh: warm-up
            gen = torch.Generator().manual_seed(step * world + rank)
            ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
            barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = forward(input_ids=ids, labels=ids).loss
            overlaps = mode.startswith("overlap")
            in_backward = optimizer.reducing_in_backward() if overlaps else None
            with in_backward or contextlib.nullcontext():
                loss.backward()
            optimizer.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        state = model.state_dict()  # settles what the last step left for the next forward
        weights = torch.cat([t.detach().reshape(-1) for t in state.values()])
        results[mode] = {"times": times, "checksum": float(weights.double().sum())}
        results[f"{mode}-weights"] = weights
    if rank == 0:
        first = results[f"{OURS[0]}-weights"]
        same = all(torch.equal(first, results[f"{mode}-weights"]) for mode in OURS[1:])
        torch.save({m: results[m] for m in MODES} | {"same": same}, Path(out) / "result.pt")
    leave_process_group()


def _build(mode: str, args: OverlapConfig, comm: ProcessGroupCommunicator) -> tuple:
    """``(model, optimizer, what forward calls)`` of ``mode`` on this rank."""
    model = build_model(llama_config(args.model))
    if mode == "ddp-adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
        return model, optimizer, DistributedDataParallel(model)
    model = apply_weight_norm(model)
    broadcast_parameters(model, comm)
    groups = projected_param_groups(model, rank=args.rank, update_proj_gap=10_000, scale=0.25)
    ours = GradNormLoRPAdamW(groups, lr=1e-3, communicator=comm, gradient_reduction="low_rank")
    if mode == "overlap+next-fwd":
        ours.applying_directions_in_forward(model)
    return model, ours, model


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser(
        OverlapConfig, prog="benchmarks.overlap", description=__doc__.splitlines()[0]
    )
    args = config_from_namespace(OverlapConfig, parse_namespace(parser, argv))
    rows, record = [], {}
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            init = str(Path(tmp) / "rendezvous")
            mp.start_processes(
                _rank, args=(world, init, args, tmp), nprocs=world, start_method="fork"
            )
            result = torch.load(Path(tmp) / "result.pt", weights_only=False)
        medians = {mode: statistics.median(result[mode]["times"]) for mode in MODES}
        for mode in MODES:
            after, ddp = medians[mode] / medians["after"], medians[mode] / medians["ddp-adamw"]
            rows.append((world, mode, f"{medians[mode] * 1e3:.1f}", f"{after:.3f}", f"{ddp:.3f}"))
        record[world] = {
            "median_step_s": medians,
            "times_s": {mode: result[mode]["times"] for mode in MODES},
            "same_weights": result["same"],
        }
    print(f"{args.model}, rank {args.rank}, gloo ranks, {args.steps} timed steps")
    print(format_table(["N", "mode", "step ms (median)", "x after", "x ddp-adamw"], rows))
    for world, entry in record.items():
        print(
            f"N={world}: our three modes end with bitwise the same weights: {entry['same_weights']}"
        )
    payload = {"environment": environment(), "settings": asdict(args), "by_world": record}
    print(f"wrote {write_json(args.json, payload)}")


if __name__ == "__main__":
    main()
