"""GradNormLoRPAdamW in an Accelerate script with the FSDP plugin, ``fsdp_version: 2``.

Trains a tiny weight-normalised LLaMA (built from a config: offline) on learnable token sequences
for ``--steps`` steps, ``Accelerator.save_state`` at ``--save-at`` (DCP shards, reloadable on
another number of processes), ``--resume`` continues from such a state in a new job. The whole
fp32 weights go to ``OUT/weights.pt`` and the merged model to ``OUT/final`` (stock
``from_pretrained`` loads it).

The order matters (see docs/distributed.md, "FSDP2"): the model is sharded FIRST with
``gnlorp_dist.distributed.fully_shard_model``, the optimizer is built from the sharded (DTensor)
parameters, and only then ``accelerator.prepare(model, optimizer)``: Accelerate leaves a model
that is already an ``FSDPModule`` as it is, and maps each optimizer parameter onto itself.
Handing Accelerate an unsharded model with an optimizer built on it makes Accelerate swap the
optimizer's parameters for new DTensors behind its back (``fsdp2_switch_optimizer_parameters``),
after the optimizer was built for plain tensors. ``GradNormLoRPAdamW`` plans its layout at the
first step, so that path works too (``--let-accelerate-shard``, the plugin wrapping each
``LlamaDecoderLayer``: the same losses); shard first all the same with optimizers that bind their
parameters when built.

Launch on GPUs: ``accelerate launch --config_file launch/accelerate_fsdp2.yaml
examples/accelerate_fsdp2_train.py --out run``. On CPUs Accelerate 1.15 has no FSDP (a CPU job runs
each process alone, or as ``MULTI_CPU`` DDP, and the FSDP plugin is silently ignored);
``--cpu-fsdp`` (what the tests use) makes it take the FSDP2 path over gloo anyway::

    torchrun --nproc_per_node 2 examples/accelerate_fsdp2_train.py --cpu-fsdp --out run
    torchrun --nproc_per_node 1 examples/accelerate_fsdp2_train.py --cpu-fsdp --out run1 \\
        --resume run/state-4

Mixed precision: ``--mixed-precision bf16``, or ``accelerate launch --mixed_precision bf16``
(``ACCELERATE_MIXED_PRECISION``), gives FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)``: the shards, the optimizer and its state stay float32, each layer's
all-gathered weights and the matmuls are bf16, gradients are reduce-scattered in float32. It goes
to ``fully_shard_model`` (a model Accelerate receives already sharded keeps its own policy) and to
the plugin (``--let-accelerate-shard``). fp16 is refused (it needs loss scaling). Each run prints
the dtype the model's matmuls really ran in (``compute torch.bfloat16``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp_dist import (
    GradNormLoRPAdamW,
    apply_weight_norm,
    merge_weight_norm,
    projected_param_groups,
)
from gnlorp_dist.distributed import full_model_state_dict, fully_shard_model

GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 128


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=4)
    parser.add_argument("--resume", type=Path, help="a state-<step> folder written by save_state")
    parser.add_argument("--optimizer", choices=("gradnormlorp", "adamw"), default="gradnormlorp")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--update-proj-gap", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--cpu-fsdp",
        action="store_true",
        help="CPU host: run Accelerate's FSDP2 path over gloo (Accelerate 1.15 has no CPU FSDP)",
    )
    parser.add_argument(
        "--let-accelerate-shard",
        action="store_true",
        help="hand Accelerate the unsharded model and an optimizer built on it (its own recipe)",
    )
    parser.add_argument("--world-size", type=int, help="refuse to run on another process count")
    parser.add_argument(
        "--mixed-precision",
        help="no or bf16 (default: ACCELERATE_MIXED_PRECISION, set by accelerate launch, else no)",
    )
    return parser.parse_args()


def mixed_precision_policy(flag: str | None) -> MixedPrecisionPolicy | None:
    """FSDP2's policy for ``--mixed-precision`` (else ``accelerate launch --mixed_precision``,
    its environment variable): None for ``no``; bf16 compute with float32 gradient reduction
    for ``bf16``; anything else refused."""
    value = flag if flag is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value == "no":
        return None
    if value != "bf16":
        raise ValueError(
            f"mixed precision {value!r} is not supported by this example: use bf16 or no (fp16 "
            "needs loss scaling, which it does not set up)"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def make_accelerator(
    cpu_fsdp: bool, accelerate_shards: bool, policy: MixedPrecisionPolicy | None
) -> Accelerator:
    wrap: dict = {}
    if accelerate_shards:  # the same units as fully_shard_model's. Not otherwise: prepare looks
        # for the class even in a sharded model, where FSDP2 has renamed it (FSDPLlamaDecoderLayer).
        wrap = {
            "auto_wrap_policy": "transformer_based_wrap",
            "transformer_cls_names_to_wrap": ["LlamaDecoderLayer"],
        }
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, state_dict_type="SHARDED_STATE_DICT", mixed_precision_policy=policy, **wrap
    )
    if cpu_fsdp:
        if torch.cuda.is_available():
            raise ValueError("--cpu-fsdp is for CPU hosts; on GPUs use accelerate launch alone")
        # Accelerate turns on FSDP only for a GPU-type job. Set up the CPU job (gloo, device
        # cpu), then let Accelerator() see it as a multi-device one, so it selects FSDP2; the
        # device stays the CPU (it is fixed when PartialState is first created).
        state = PartialState(cpu=True, backend="gloo")
        state.distributed_type = DistributedType.MULTI_GPU
    # The plugin's policy decides; mixed_precision="no" keeps Accelerate from also wrapping the
    # forward in autocast on top of it.
    accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="no")
    if not accelerator.is_fsdp2:  # Accelerate falls back to DDP or one process silently
        raise ValueError(
            f"Accelerate chose {accelerator.distributed_type.name}, not FSDP2: launch with "
            "`accelerate launch --config_file launch/accelerate_fsdp2.yaml` on GPUs, or with "
            "--cpu-fsdp under torchrun on a CPU host"
        )
    return accelerator


def build_model() -> torch.nn.Module:
    torch.manual_seed(11)  # the same initial weights on every rank and in every job
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return apply_weight_norm(LlamaForCausalLM(config))


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of step ``step``'s global batch: a function of the step alone, so a
    resumed job sees exactly the batches the uninterrupted one saw."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=gen)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=gen)
    return ((start + stride * torch.arange(SEQ)) % VOCAB).chunk(world)[rank]


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr)
    groups = projected_param_groups(
        model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=0.25
    )
    return GradNormLoRPAdamW(groups, lr=args.lr)


def record_compute_dtype(model: torch.nn.Module) -> Callable[[], str]:
    """The dtype of ``model``'s logits as last computed (what its matmuls really ran in)."""
    seen: list[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return lambda: str(seen[-1]) if seen else "unknown"


def main() -> None:
    args = parse()
    policy = mixed_precision_policy(args.mixed_precision)
    accelerator = make_accelerator(args.cpu_fsdp, args.let_accelerate_shard, policy)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.world_size is not None and world != args.world_size:
        raise ValueError(f"--world-size {args.world_size}, but this job has {world} processes")
    accelerator.print(f"engine {accelerator.distributed_type.name} fsdp2 | world {world}")
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.let_accelerate_shard:
        # Accelerate shards the model and swaps the optimizer's parameters for the DTensors:
        # GradNormLoRPAdamW plans its layout at the first step, so it sees the shards.
        model = build_model()
        optimizer = build_optimizer(args, model)
    else:
        model = fully_shard_model(  # 1. shard
            build_model().to(accelerator.device), mixed_precision=policy
        )
        optimizer = build_optimizer(args, model)  # 2. the optimizer over the DTensor shards
    compute_dtype = record_compute_dtype(model)
    model, optimizer = accelerator.prepare(model, optimizer)  # 3. (sharded: kept as they are)
    first = 0
    if args.resume is not None:
        accelerator.load_state(str(args.resume))  # DCP: re-cut to this job's world size
        first = int(args.resume.name.removeprefix("state-"))
    for step in range(first, args.steps):
        ids = batch(step, rank, world).to(accelerator.device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == args.save_at:
            accelerator.save_state(str(args.out / f"state-{step + 1}"))
        accelerator.print(f"step {step + 1}/{args.steps} | loss {loss.item():.4f} | world {world}")
    accelerator.print(f"compute {compute_dtype()}")
    weights = full_model_state_dict(accelerator.unwrap_model(model))  # every rank: a collective
    if accelerator.is_main_process:
        torch.save(weights, args.out / "weights.pt")
        plain = build_model()
        plain.load_state_dict(weights)
        merge_weight_norm(plain).save_pretrained(args.out / "final")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
