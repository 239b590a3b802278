"""The ``zero2-adamw`` scheme: DeepSpeed ZeRO-2 + ``torch.optim.AdamW`` (DeepSpeed's
``"optimizer": {"type": "AdamW", "params": {"torch_adam": true}}`` on the CPU, as
``benchmarks/deepspeed_zero.py``), default ZeRO settings, in a process group DeepSpeed makes.

DeepSpeed's config and process group are the ZeRO benchmark's (:mod:`gnlorp_dist.bench.zero`),
which imports DeepSpeed (5 s) only when a ZeRO-2 launch needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from gnlorp_dist.bench import zero

if TYPE_CHECKING:
    from transformers import LlamaConfig


def import_deepspeed() -> Any:
    """``deepspeed`` with its CPU accelerator (import it once before forking: every rank
    inherits it)."""
    return zero.import_deepspeed("cpu")


def process_group(rank: int, world_size: int, init_file: str) -> AbstractContextManager[None]:
    """torch.distributed for this forked rank through ``deepspeed.init_distributed`` (gloo),
    met at ``init_file``."""
    return zero.distributed(rank, world_size, init_file, "cpu")


def adamw_step(
    model: torch.nn.Module, config: LlamaConfig, *, batch: int, seq: int, world_size: int
) -> tuple[Callable[[torch.Tensor], float], dict[str, Any]]:
    """``model`` in a ZeRO-2 engine with DeepSpeed's AdamW (``batch`` sequences of ``seq``
    tokens per rank, ``world_size`` ranks): a train-step function, and which path DeepSpeed
    took (reduce-scatter of gradient partitions or all-reduce: the engine optimizer's
    ``reduce_scatter``, ``contiguous_gradients`` and ``overlap_comm``)."""
    deepspeed = import_deepspeed()
    settings = zero.RunSettings(config=config, batch=batch, seq=seq)
    ds_config = zero.deepspeed_config(zero.Case(zero.DEEPSPEED_ADAMW, 2), settings, world_size)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=ds_config
    )

    def step(ids: torch.Tensor) -> float:
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    flags = {
        name: getattr(engine.optimizer, name, None)
        for name in ("reduce_scatter", "contiguous_gradients", "overlap_comm")
    }
    return step, flags
