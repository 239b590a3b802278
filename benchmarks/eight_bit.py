"""8-bit against 32-bit optimizer states: state bytes and the loss after a 200-step run.

Trains the same small LLaMA (llama_nano, Shakespeare, same seed and data order) with
GradNormLoRP at 32 and at 8 bits through ``gnlorp_dist.training.run.train`` and prints the optimizer
state bytes (exact, from the optimizer after training), the final training loss (mean of the last
10 steps, to smooth batch noise), the evaluation loss, and the relative gaps.

Usage: ``python -m benchmarks.eight_bit [--steps 200] [--seq-len 64] [--json PATH]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gnlorp_dist.bench.harness import RESULTS_DIR, environment, format_table, write_json
from gnlorp_dist.memory.bytes import optimizer_state_bytes
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace
from gnlorp_dist.training.config import RunConfig
from gnlorp_dist.training.run import prepare, run_training


def _state_bytes(optimizer, moments_only: bool) -> int:
    return optimizer_state_bytes(optimizer)["moments" if moments_only else "total"]


@dataclass(frozen=True, kw_only=True)
class EightBitConfig:
    """The run both precisions train: model, length, batch."""

    model: str = option("llama_nano", metavar="NAME")
    """A named LLaMA shape and recipe (llama_nano, llama_micro, llama_60m ...)."""
    steps: int = 200
    """Optimizer steps of each run."""
    seq_len: int = 64
    """Tokens per sequence."""
    batch_size: int = 4
    """Sequences per step."""
    eval_batches: int = 16
    """Held-out micro-batches of the final evaluation."""
    json: str = option(str(RESULTS_DIR / "eight_bit.json"), metavar="PATH")
    """Where to write the results."""


def run(bits: int, args: EightBitConfig, out: Path) -> dict:
    config = RunConfig(
        model=args.model,
        bits=bits,
        max_steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        save_every=0,
        eval_batches=args.eval_batches,
        output_dir=str(out / f"bits{bits}"),
        resume="never",
        progress=False,
        log_every=50,
    )
    started = time.perf_counter()
    prepared = prepare(config)
    result = run_training(prepared)
    tail = result.losses[-10:]
    return {
        "bits": bits,
        "state_bytes": _state_bytes(prepared.optimizer, moments_only=False),
        "moment_bytes": _state_bytes(prepared.optimizer, moments_only=True),
        "final_train_loss_mean10": sum(tail) / len(tail),
        "eval_loss": result.eval_loss,
        "eval_perplexity": result.eval_perplexity,
        "seconds": time.perf_counter() - started,
        "losses": result.losses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        EightBitConfig, prog="benchmarks.eight_bit", description=__doc__.splitlines()[0]
    )
    args = config_from_namespace(EightBitConfig, parse_namespace(parser, argv))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(bits, args, Path(tmp)) for bits in (32, 8)]
    full, quant = rows
    table = [
        [
            str(r["bits"]),
            f"{r['state_bytes']:,}",
            f"{r['moment_bytes']:,}",
            f"{r['moment_bytes'] / full['moment_bytes']:.3f}",
            f"{r['final_train_loss_mean10']:.4f}",
            f"{r['eval_loss']:.4f}",
            f"{(r['final_train_loss_mean10'] / full['final_train_loss_mean10'] - 1) * 100:+.2f}%",
            f"{r['seconds']:.0f}",
        ]
        for r in rows
    ]
    header = ["bits", "state B", "moments B", "x fp32", "loss@end", "eval loss", "gap", "s"]
    print(
        f"\nGradNormLoRP {args.model}, {args.steps} steps of {args.batch_size} x {args.seq_len} "
        "tokens, same seed and data; loss@end = mean of the last 10 steps:"
    )
    print(format_table(header, table))
    record = {
        "benchmark": "eight_bit",
        "environment": environment(),
        "settings": {k: str(v) for k, v in asdict(args).items()},
        "rows": rows,
        "moment_ratio": quant["moment_bytes"] / full["moment_bytes"],
        "relative_loss_gap": quant["final_train_loss_mean10"] / full["final_train_loss_mean10"] - 1,
    }
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
