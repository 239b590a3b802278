"""Issue 14's memory features measured: state bytes, basis quality, and the loss they cost.

Part 1, state bytes (exact, from the real optimizer after one step): the 4.2M-parameter LLaMA of
the issue (hidden 256, 4 layers, vocab 2000, GradNormLoRP at rank 64) with fp32 states, 8-bit
moments, and 8-bit moments with INT8 or INT4 bases; ratios against fp32 measured in the same run.
Next to them, the gradient energy each quantised basis keeps against its float basis on the
gradient it was computed from (``||G P_q^T||^2 / ||G P^T||^2``, all 28 projected matrices).

Part 2, training (llama_nano on the embedded Shakespeare corpus through ``gnlorp-train``'s own
code, same seed and data order unless said): fp32, a second fp32 seed (the run-to-run noise),
8-bit, 8-bit + INT8 bases, 8-bit + INT4 bases, and 8-bit with lazy refresh against the fixed gap:
final loss (mean of the last 10 steps), eval loss, SVDs computed, optimizer state bytes.

    python -m benchmarks.memory_features                 # about 10 minutes on 2 cores
    python -m benchmarks.memory_features --steps 20      # a smoke run
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.bench.harness import RESULTS_DIR, environment, format_table, write_json
from gnlorp_dist.memory.bytes import optimizer_state_bytes
from gnlorp_dist.optim.projection import project, projection_side
from gnlorp_dist.optim.quantized_basis import dequantize_basis, quantize_basis
from gnlorp_dist.optim.spec import projection_of
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace
from gnlorp_dist.training.config import RunConfig
from gnlorp_dist.training.run import prepare, run_training

STATE_VARIANTS = {
    "fp32": {"bits": 32},
    "8-bit": {"bits": 8},
    "8-bit + INT8 bases": {"bits": 8, "proj_bits": 8},
    "8-bit + INT4 bases": {"bits": 8, "proj_bits": 4},
}


def issue_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return apply_weight_norm(LlamaForCausalLM(config))


def state_bytes(variant: dict) -> dict:
    model = issue_model()
    options = {"proj_bits": variant["proj_bits"]} if "proj_bits" in variant else {}
    groups = projected_param_groups(model, rank=64, update_proj_gap=200, scale=0.25, **options)
    optimizer = GradNormLoRPAdamW(groups, lr=1e-3, bits=variant["bits"])
    ids = torch.randint(0, 2000, (4, 64), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    counts = optimizer_state_bytes(optimizer)
    totals = {
        "moments": counts["moments"],
        "bases": counts["projection"],
        "other": counts["total"] - counts["moments"] - counts["projection"],
    }
    energies = []
    if "proj_bits" in variant:
        for group in groups:
            if "rank" not in group:
                continue
            for param in group["params"]:
                grad, basis = param.grad, _float_basis(optimizer, param)
                side = projection_side(grad.shape, "std")
                restored = dequantize_basis(
                    *quantize_basis(basis, variant["proj_bits"]), basis.dtype
                )
                full = project(grad, basis, side).square().sum()
                energies.append(float(project(grad, restored, side).square().sum() / full))
    parameters = sum(p.numel() for p in model.parameters())
    return {**totals, "total": sum(totals.values()), "energies": energies, "parameters": parameters}


def _float_basis(optimizer: GradNormLoRPAdamW, param: torch.Tensor) -> torch.Tensor:
    """The float basis of ``param``'s gradient, as the refresh computed it (the stored one may be
    codes): recomputed from the same gradient by the optimizer's own method."""
    group, _name = optimizer.group_and_name(param)
    return optimizer.compute_basis(projection_of(group), param.grad, {"step": 0})


TRAIN_VARIANTS = {
    "fp32": {},
    "fp32, seed 1 (noise)": {"seed": 1},
    "8-bit": {"bits": 8},
    "8-bit + INT8 bases": {"bits": 8, "proj_bits": 8},
    "8-bit + INT4 bases": {"bits": 8, "proj_bits": 4},
    "8-bit, lazy refresh 0.5": {"bits": 8, "lazy_refresh_threshold": 0.5},
    "8-bit, lazy refresh 0.3": {"bits": 8, "lazy_refresh_threshold": 0.3},
}


@dataclass(frozen=True, kw_only=True)
class MemoryFeaturesConfig:
    """The training runs of part 2 (part 1 has fixed sizes)."""

    steps: int = 200
    """Optimizer steps of each training run."""
    gap: int = 20
    """update_proj_gap of the runs."""
    seq_len: int = 64
    """Tokens per sequence."""
    batch_size: int = 4
    """Sequences per step."""
    skip_training: bool = False
    """Only part 1 (state bytes and basis quality)."""
    json: str = option(str(RESULTS_DIR / "memory_features.json"), metavar="PATH")
    """Where to write the results."""


def train(name: str, overrides: dict, args: MemoryFeaturesConfig, out: Path) -> dict:
    config = RunConfig(
        model="llama_nano",
        max_steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        update_proj_gap=args.gap,
        save_every=0,
        eval_batches=16,
        output_dir=str(out / name.replace(" ", "_").replace(",", "")),
        resume="never",
        progress=False,
        log_every=10**6,
        **overrides,
    )
    started = time.perf_counter()
    prepared = prepare(config)
    result = run_training(prepared)
    optimizer = prepared.optimizer
    tail = result.losses[-10:]
    overlaps = [s["subspace_overlap"] for s in optimizer.state.values() if "subspace_overlap" in s]
    return {
        "name": name,
        "loss_mean10": sum(tail) / len(tail),
        "eval_loss": result.eval_loss,
        "svds": optimizer.refresh_count,
        "state_bytes": optimizer_state_bytes(optimizer)["total"],
        "mean_last_overlap": sum(overlaps) / len(overlaps) if overlaps else None,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        MemoryFeaturesConfig, prog="benchmarks.memory_features", description=__doc__.splitlines()[0]
    )
    args = config_from_namespace(MemoryFeaturesConfig, parse_namespace(parser, argv))

    states = {name: state_bytes(variant) for name, variant in STATE_VARIANTS.items()}
    fp32 = states["fp32"]["total"]
    rows = []
    for name, s in states.items():
        energy = (
            f"{min(s['energies']):.4f} / {sum(s['energies']) / len(s['energies']):.4f}"
            if s["energies"]
            else "-"
        )
        rows.append(
            [
                name,
                f"{s['moments']:,}",
                f"{s['bases']:,}",
                f"{s['total']:,}",
                f"{s['total'] / fp32:.3f}",
                energy,
            ]
        )
    print(
        f"\n(a) optimizer state after one step, LLaMA {states['fp32']['parameters']:,} parameters "
        "(hidden 256, 4 layers, vocab 2000), GradNormLoRP rank 64:"
    )
    print(
        format_table(
            ["states", "moments B", "bases B", "total B", "x fp32", "energy kept min / mean"], rows
        )
    )

    training = []
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            training = [train(name, o, args, Path(tmp)) for name, o in TRAIN_VARIANTS.items()]
        base = training[0]
        rows = [
            [
                r["name"],
                f"{r['loss_mean10']:.4f}",
                f"{(r['loss_mean10'] / base['loss_mean10'] - 1) * 100:+.2f}%",
                f"{r['eval_loss']:.4f}",
                str(r["svds"]),
                f"{r['state_bytes']:,}",
                "-" if r["mean_last_overlap"] is None else f"{r['mean_last_overlap']:.3f}",
                f"{r['seconds']:.0f}",
            ]
            for r in training
        ]
        print(
            f"\n(b) llama_nano, Shakespeare, {args.steps} steps of {args.batch_size} x "
            f"{args.seq_len} tokens, update_proj_gap {args.gap}; loss = mean of the last 10 steps:"
        )
        print(
            format_table(
                ["run", "loss", "vs fp32", "eval loss", "SVDs", "state B", "overlap", "s"], rows
            )
        )
    write_json(
        args.json,
        {
            "benchmark": "memory_features",
            "environment": environment(),
            "settings": {k: str(v) for k, v in asdict(args).items()},
            "states": states,
            "state_ratios": {name: s["total"] / fp32 for name, s in states.items()},
            "training": training,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
