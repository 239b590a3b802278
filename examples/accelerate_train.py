"""GradNormLoRPAdamW in an Accelerate user script: DDP or the DeepSpeed plugin, save/load state.

Trains a tiny weight-normalised LLaMA (built from a config: offline) on learnable token
sequences for ``--steps`` steps, saves ``Accelerator.save_state`` at ``--save-at``, and with
``--resume`` continues a run from that state in a new job. Final merged weights go to
``OUT/final`` (stock ``from_pretrained`` loads them) and the raw weights to ``OUT/weights.pt``.

Launch on CPU (2 processes; see docs/clients.md for why these exact flags)::

    # DDP
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_train.py --out run
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_train.py --out run2 \\
        --resume run/state-10
    # DeepSpeed plugin, ZeRO-2 (no ACCELERATE_USE_CPU: it would silently drop DeepSpeed)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/accelerate_train.py --out ds \\
        --zero-stage 2 --mixed-precision bf16

On GPUs: ``accelerate launch --num_processes N examples/accelerate_train.py ...`` (or torchrun).

Mixed precision: ``--mixed-precision bf16``, or ``accelerate launch --mixed_precision bf16``
(``ACCELERATE_MIXED_PRECISION``). DDP runs the forward under bf16 autocast; the DeepSpeed plugin
gets ``"bf16": {"enabled": true}`` (bf16 weights, fp32 master copies in the optimizer). fp16 is
refused (it needs loss scaling, which this example does not set up). Each run prints the dtype
the model's matmuls really ran in (``compute torch.bfloat16``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.integrations.transformers import consolidate_for_save, merged_state_dict

GLOBAL_BATCH, SEQ = 4, 16


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-at", type=int, default=10)
    parser.add_argument("--resume", type=Path, help="a state-<step> folder written by save_state")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed plugin")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--update-proj-gap", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--mixed-precision",
        help="no or bf16 (default: ACCELERATE_MIXED_PRECISION, set by accelerate launch, else no)",
    )
    return parser.parse_args()


def resolve_mixed_precision(flag: str | None) -> str:
    """``--mixed-precision``, else ``accelerate launch --mixed_precision`` (its environment
    variable), else ``no``; refused unless ``no`` or ``bf16``."""
    value = flag if flag is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in ("no", "bf16"):
        raise ValueError(
            f"mixed precision {value!r} is not supported by this example: use bf16 or no (fp16 "
            "needs loss scaling, which it does not set up)"
        )
    return value


def make_accelerator(zero_stage: int | None, mixed_precision: str) -> Accelerator:
    if zero_stage is None:  # DDP (CPU: ACCELERATE_USE_CPU=1 in the environment)
        return Accelerator(mixed_precision=mixed_precision)  # bf16: autocast in the forward
    if os.environ.get("ACCELERATE_USE_CPU") and not torch.cuda.is_available():
        raise ValueError(
            "ACCELERATE_USE_CPU=1 with --zero-stage: Accelerate would silently drop DeepSpeed and "
            "run DDP. Unset ACCELERATE_USE_CPU and set DS_ACCELERATOR=cpu instead."
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = {
        "zero_optimization": {"stage": zero_stage},
        # No prepared dataloader here, so the batch sizes must be numbers, not "auto".
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0,  # DeepSpeed clips at 1.0 unless told
        "zero_allow_untested_optimizer": True,  # ours is DeepSpeed's client optimizer
        # Explicit: Accelerate fills only "auto", so a fixed False here would silently train fp32.
        "bf16": {"enabled": mixed_precision == "bf16"},
    }
    if not torch.cuda.is_available():
        import deepspeed  # noqa: PLC0415

        # CPU: skip the minutes-long JIT build of the shared-memory op; gloo gives the same sums.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        PartialState(cpu=True, backend="gloo")  # must exist before Accelerator(deepspeed_plugin)
    return Accelerator(
        mixed_precision=mixed_precision,
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
        kwargs_handlers=[
            InitProcessGroupKwargs(backend="gloo" if not torch.cuda.is_available() else None)
        ],
    )


def build_model() -> torch.nn.Module:
    torch.manual_seed(11)  # the same initial weights on every rank and in every job
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return apply_weight_norm(LlamaForCausalLM(config))


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of step ``step``'s global batch: a function of the step alone, so a
    resumed job sees exactly the batches the uninterrupted one saw (no sampler state to keep)."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, 128, (GLOBAL_BATCH, 1), generator=gen)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=gen)
    return ((start + stride * torch.arange(SEQ)) % 128).chunk(world)[rank]


def record_compute_dtype(model: torch.nn.Module) -> Callable[[], str]:
    """The dtype of ``model``'s logits as last computed (what its matmuls really ran in)."""
    seen: list[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return lambda: str(seen[-1]) if seen else "unknown"


def main() -> None:
    args = parse()
    accelerator = make_accelerator(args.zero_stage, resolve_mixed_precision(args.mixed_precision))
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.print(f"engine {accelerator.distributed_type.name} | world {world}")
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
    model = build_model()
    compute_dtype = record_compute_dtype(model)
    groups = projected_param_groups(
        model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=0.25
    )
    optimizer = GradNormLoRPAdamW(groups, lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    first = 0
    if args.resume is not None:
        accelerator.load_state(str(args.resume))  # model, optimizer (every rank keeps its shard)
        first = int(args.resume.name.removeprefix("state-"))
    for step in range(first, args.steps):
        ids = batch(step, rank, world).to(accelerator.device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == args.save_at:
            # save_state writes optimizer.state_dict() from rank 0 only (DDP); consolidate first,
            # on every rank. Under DeepSpeed each rank saves its own shard: nothing to gather.
            if accelerator.distributed_type.name != "DEEPSPEED":
                consolidate_for_save(optimizer)
            accelerator.save_state(str(args.out / f"state-{step + 1}"))
        accelerator.print(f"step {step + 1}/{args.steps} | loss {loss.item():.4f} | world {world}")
    accelerator.print(f"compute {compute_dtype()}")
    unwrapped = accelerator.unwrap_model(model)
    merged = merged_state_dict(unwrapped)  # every rank: a collective at ZeRO-3
    if accelerator.is_main_process:
        torch.save(merged, args.out / "weights.pt")
        # save_pretrained empties the dict it is given (it pops tensors as it writes shards).
        unwrapped.save_pretrained(args.out / "final", state_dict=dict(merged))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
