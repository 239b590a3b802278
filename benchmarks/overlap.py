"""Does starting the low-rank reductions inside backward pay? Step time with and without it.

Two gloo ranks (forked, ``RANK``/``WORLD_SIZE`` set as torchrun sets them) train the same
weight-normalised LLaMA with ``GradNormLoRPAdamW(gradient_reduction="low_rank")``, the model not
in DDP. ``overlap`` wraps each backward in ``optimizer.reducing_in_backward()`` (what
gnlorp-train does): each projected matrix's low-rank reduce and each dense block's reduce start
as soon as its gradient is final. ``after`` runs the same reduces inside ``step()``. Both runs
must end with bitwise the same weights (printed); the table gives the median whole-step time
(forward, backward, step) over the timed steps, no refresh among them, and the ratio.

    python -m benchmarks.overlap                     # llama_60m, 2 ranks, a few minutes
    python -m benchmarks.overlap --model llama_nano --steps 6
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

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.bench.harness import RESULTS_DIR, environment, format_table, write_json
from gnlorp_dist.distributed import ProcessGroupCommunicator, broadcast_parameters
from gnlorp_dist.distributed.rendezvous import barrier, join_file_group, leave_process_group
from gnlorp_dist.models import build_model, llama_config
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

MODES = ("after", "overlap")


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
        model = apply_weight_norm(build_model(llama_config(args.model)))
        broadcast_parameters(model, comm)
        groups = projected_param_groups(model, rank=args.rank, update_proj_gap=10_000, scale=0.25)
        optimizer = GradNormLoRPAdamW(
            groups, lr=1e-3, communicator=comm, gradient_reduction="low_rank"
        )
        vocab = model.config.vocab_size
        times = []
        for step in range(args.warmup + args.steps):  # step 0 is the refresh: warm-up
            gen = torch.Generator().manual_seed(step * world + rank)
            ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
            barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            in_backward = optimizer.reducing_in_backward() if mode == "overlap" else None
            with in_backward or contextlib.nullcontext():
                loss.backward()
            optimizer.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        results[mode] = {"times": times, "checksum": float(weights.double().sum())}
        results[f"{mode}-weights"] = weights
    if rank == 0:
        same = torch.equal(results["after-weights"], results["overlap-weights"])
        torch.save({m: results[m] for m in MODES} | {"same": same}, Path(out) / "result.pt")
    leave_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser(
        OverlapConfig, prog="benchmarks.overlap", description=__doc__.splitlines()[0]
    )
    args = config_from_namespace(OverlapConfig, parse_namespace(parser, argv))
    with tempfile.TemporaryDirectory() as tmp:
        init = str(Path(tmp) / "rendezvous")
        mp.start_processes(_rank, args=(2, init, args, tmp), nprocs=2, start_method="fork")
        result = torch.load(Path(tmp) / "result.pt", weights_only=False)
    medians = {mode: statistics.median(result[mode]["times"]) for mode in MODES}
    rows = [
        (mode, f"{medians[mode] * 1e3:.1f}", f"{medians[mode] / medians['after']:.3f}")
        for mode in MODES
    ]
    print(f"{args.model}, rank {args.rank}, 2 gloo ranks, {args.steps} timed steps")
    print(format_table(["reduces start", "step ms (median)", "x after"], rows))
    print(f"bitwise the same weights: {result['same']}")
    payload = {
        "environment": environment(),
        "settings": asdict(args),
        "median_step_s": medians,
        "times_s": {mode: result[mode]["times"] for mode in MODES},
        "same_weights": result["same"],
    }
    print(f"wrote {write_json(args.json, payload)}")


if __name__ == "__main__":
    main()
