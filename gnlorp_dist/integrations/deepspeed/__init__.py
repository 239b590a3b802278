"""GradNormLoRPAdamW under DeepSpeed: ZeRO stages 0-3, bf16, optimizer offload, checkpoints.

The plain call works::

    optimizer = GradNormLoRPAdamW(projected_param_groups(model, rank=128, ...), lr=1e-2)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)

At ZeRO 1/2/3 DeepSpeed steps the optimizer with flat partitions; the optimizer recognises the
layout (:mod:`.layouts`) and projects each matrix's true 2-D gradient, sharded: each matrix's
low-rank moments and SVD on one owner rank, partial low-rank sums and directions between ranks
(:mod:`gnlorp_dist.optim.driver`). :func:`initialize` is the same call after
:func:`check_deepspeed_config`, which refuses unsupported settings with the fix.
"""

from __future__ import annotations

from gnlorp_dist.integrations.deepspeed.checkpoint import (
    initialize_from_checkpoint,
    save_checkpoint,
)
from gnlorp_dist.integrations.deepspeed.config import (
    check_deepspeed_config,
    fill_auto_values,
    initialize,
    load_deepspeed_config,
)
from gnlorp_dist.integrations.deepspeed.layouts import (
    Zero3Layout,
    Zero12Layout,
    detect_deepspeed_layout,
)

__all__ = [
    "Zero12Layout",
    "Zero3Layout",
    "check_deepspeed_config",
    "detect_deepspeed_layout",
    "fill_auto_values",
    "initialize",
    "initialize_from_checkpoint",
    "save_checkpoint",
    "load_deepspeed_config",
]
