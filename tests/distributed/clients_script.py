"""Trainer / SFTTrainer scenarios with GradNormLoRPAdamW, run by tests/distributed/test_clients.py.

``python clients_script.py OUT one`` runs the one-process scenarios; ``torchrun --nproc_per_node 2
clients_script.py OUT two`` the 2-rank ones (DDP, DeepSpeed ZeRO-2/3), all in ONE launch so the
suite pays the import and start-up cost once. Rank 0 writes ``OUT/<mode>.pt``: per scenario the
final full weights, the refresh count summed over ranks, the world size and what the Trainer
really ran (DeepSpeed engine or not).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

STEPS, SAVE_AT, GAP, RANK, GLOBAL_BATCH, SEQ = 12, 6, 4, 4, 4, 16
LR = 1e-2


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def build_model():
    from transformers import LlamaForCausalLM

    from gnlorp_dist import apply_weight_norm

    torch.manual_seed(11)
    return apply_weight_norm(LlamaForCausalLM(llama_config()))


def dataset(with_labels: bool = True):
    """Arithmetic sequences mod 128 (random start and stride): learnable, every row SEQ long."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(5)
    n = STEPS * GLOBAL_BATCH
    start = torch.randint(3, 128, (n, 1), generator=gen)
    stride = torch.randint(1, 4, (n, 1), generator=gen)
    ids = ((start + stride * torch.arange(SEQ)) % 125 + 3).tolist()  # ids 0-2 are specials
    columns = {"input_ids": ids}
    if with_labels:
        columns["labels"] = ids
    return Dataset.from_dict(columns)


def training_args(
    out: str, world: int, deepspeed: dict | None = None, sft: bool = False, **overrides
):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
        disable_tqdm=True, logging_steps=1, seed=0, weight_decay=0.0, deepspeed=deepspeed,
        save_only_model=False, dataloader_num_workers=0,
    )  # fmt: skip
    kwargs.update(overrides)
    if sft:
        from trl import SFTConfig

        # TRL defaults to bf16 and gradient checkpointing; the comparison with the Trainer is fp32.
        return SFTConfig(
            **kwargs, max_length=SEQ, packing=False, bf16=False, gradient_checkpointing=False
        )
    return TrainingArguments(**kwargs)


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 0,  # DeepSpeed clips at 1.0 unless told; one process does not clip
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
    }


def gnlorp_config(bits: int = 32):
    from gnlorp_dist.integrations.transformers import GradNormLoRPConfig

    # 8-bit: this model's moments are far under the default min_8bit_size (4096).
    extra = {"bits": 8, "min_8bit_size": 64} if bits == 8 else {}
    return GradNormLoRPConfig(rank=RANK, update_proj_gap=GAP, scale=0.25, **extra)


def eight_bit_moments(optimizer) -> int:
    """State tensors of ``optimizer`` held as 8-bit codes (uint8), on this rank."""
    return sum(
        isinstance(v, torch.Tensor) and v.dtype == torch.uint8
        for state in optimizer.state.values()
        for v in state.values()
    )


def tokenizer():
    from gnlorp_dist.finetune.tokenizer import build_word_level_tokenizer

    texts = ["to be or not to be that is the question"] * 4
    return build_word_level_tokenizer(texts, model_type="llama", vocab_size=64, max_length=SEQ)


def full_weights(model) -> dict[str, torch.Tensor]:
    from gnlorp_dist.integrations.transformers import _gathered

    model = getattr(model, "module", model)
    out = {}
    for name, param in model.named_parameters():
        with _gathered([param]):
            out[name] = param.detach().clone()
    return out


def reset_clients() -> None:
    """Let the next Trainer of this process pick its own engine (DDP or DeepSpeed)."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()


def run(out: str, world: int, *, stage=None, sft=False, resume=None, plain=False, bits=32):
    """One Trainer run of STEPS steps (checkpoints every SAVE_AT); its result dict."""
    import torch.distributed as dist

    from gnlorp_dist.integrations import transformers as integ

    model = build_model()
    deepspeed = ds_config(stage) if stage is not None else None
    args = training_args(out, world, deepspeed, sft=sft)
    if sft:
        trainer = integ.GradNormLoRPSFTTrainer(
            model=model, args=args, train_dataset=dataset(with_labels=False),
            processing_class=tokenizer(), gnlorp_config=gnlorp_config(),
        )  # fmt: skip
    elif plain:  # a stock Trainer given our optimizer by the plain function and the callback
        from transformers import Trainer

        trainer = Trainer(
            model=model, args=args, train_dataset=dataset(),
            optimizer_cls_and_kwargs=integ.gnlorp_optimizer_cls_and_kwargs(model, args, gnlorp_config()),
            callbacks=[integ.GradNormLoRPCallback()],
        )  # fmt: skip
    else:
        trainer = integ.GradNormLoRPTrainer(
            model=model, args=args, train_dataset=dataset(), gnlorp_config=gnlorp_config(bits)
        )
    trainer.train(resume_from_checkpoint=resume)
    optimizer = integ._find_gnlorp(trainer.optimizer)
    refreshes = torch.tensor([optimizer.refresh_count])
    eight_bit = torch.tensor([eight_bit_moments(optimizer)])
    if dist.is_initialized():
        dist.all_reduce(refreshes)
        dist.all_reduce(eight_bit)
    result = {
        "weights": full_weights(trainer.model),
        "refreshes": int(refreshes),
        "eight_bit_moments": int(eight_bit),
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "deepspeed": type(trainer.model_wrapped).__name__,
        "zero3_partitioned": any(hasattr(p, "ds_id") for p in trainer.model.parameters()),
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    trainer.save_model(
        os.path.join(out, "merged-resumed" if resume else "merged")
    )  # every rank: a collective at ZeRO-3
    if stage is not None:
        reset_clients()
    return result


def given_optimizer_under_deepspeed(out: str, world: int) -> dict:
    """A stock Trainer given ``optimizers=(GradNormLoRPAdamW(...), None)`` with a ZeRO-2 config:
    the Trainer drops it and DeepSpeed trains torch AdamW. What the never-stepped optimizer's
    watch logged, and whether it stepped."""
    import logging

    from transformers import Trainer

    from gnlorp_dist.integrations import transformers as integ

    model = build_model()
    args = training_args(out, world, ds_config(2), max_steps=3, save_strategy="no")
    ours = integ.build_gnlorp_optimizer(model, args, gnlorp_config())
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("gnlorp_dist.optim.never_stepped").addHandler(handler)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(ours, None))
    trainer.train()
    logging.getLogger("gnlorp_dist.optim.never_stepped").removeHandler(handler)
    result = {
        "deepspeed": type(trainer.model_wrapped).__name__,
        "ours_stepped": bool(ours.state),
        "logged": logged,
    }
    reset_clients()
    return result


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    results = {}
    if mode == "two":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        world = dist.get_world_size()
        import deepspeed

        # Skip DeepSpeed's shared-memory comm op build (minutes on CPU); gloo gives the same sums.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        results["ddp"] = run(str(out / "ddp"), world)
        results["ddp-resume"] = run(
            str(out / "ddp"), world, resume=str(out / "ddp" / f"checkpoint-{SAVE_AT}")
        )
        results["ddp-plain"] = run(str(out / "ddp-plain"), world, plain=True)
        results["sft"] = run(str(out / "sft"), world, sft=True)
        for stage in (2, 3):
            name = f"zero{stage}"
            results[name] = run(str(out / name), world, stage=stage)
            results[f"{name}-resume"] = run(
                str(out / name), world, stage=stage,
                resume=str(out / name / f"checkpoint-{SAVE_AT}"),
            )  # fmt: skip
        for name, stage in (("ddp-8bit", None), ("zero2-8bit", 2)):
            results[name] = run(str(out / name), world, stage=stage, bits=8)
            results[f"{name}-resume"] = run(
                str(out / name), world, stage=stage, bits=8,
                resume=str(out / name / f"checkpoint-{SAVE_AT}"),
            )  # fmt: skip
        results["zero2-given-optimizer"] = given_optimizer_under_deepspeed(
            str(out / "zero2-given-optimizer"), world
        )
    else:
        world = 1
        results["one"] = run(str(out / "one"), 1)
        results["sft-one"] = run(str(out / "sft-one"), 1, sft=True)
        ddp_checkpoint = out / "ddp" / f"checkpoint-{SAVE_AT}"
        if ddp_checkpoint.is_dir():  # the 2-rank checkpoint, resumed on one process
            results["ddp-to-one"] = run(str(out / "ddp-to-one"), 1, resume=str(ddp_checkpoint))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out / f"{mode}.pt")


if __name__ == "__main__":
    main()
