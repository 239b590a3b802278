"""gnlorp_dist: GradNormLoRP (gradient weight-normalized low-rank projection) training.

The public API and nothing else; see README.md.

This module is also where the layers meet: the optimizer (``optim/``) sits below
``distributed/`` and ``integrations/`` and may not import them, yet the plain
``GradNormLoRPAdamW(groups)`` handed to ``deepspeed.initialize``, built over FSDP2-sharded
parameters or run under torchrun must find the engine's layout and the job's process group.
Python runs this module before any ``gnlorp_dist`` submodule, so the one explicit hand-over
below holds whatever the user imports first; no other module registers anything on import.
"""

from gnlorp_dist.distributed import communicator_for_current_process
from gnlorp_dist.integrations.deepspeed.layouts import detect_deepspeed_layout
from gnlorp_dist.integrations.fsdp2 import detect_fsdp2_layout
from gnlorp_dist.nn import (
    DEFAULT_TARGET_MODULES,
    WeightNormLinear,
    apply_weight_norm,
    merge_weight_norm,
)
from gnlorp_dist.optim import (
    GradNormLoRPAdamW,
    GradNormLoRPAdamW8bit,
    PerLayerUpdates,
    projected_param_groups,
)
from gnlorp_dist.optim.comm import use_job_communicator
from gnlorp_dist.optim.layouts import use_engine_layouts

# Cheap: neither imports DeepSpeed (its layouts read parameter attributes), and
# torch.distributed is part of torch.
use_engine_layouts(detect_deepspeed_layout, detect_fsdp2_layout)
use_job_communicator(communicator_for_current_process)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "GradNormLoRPAdamW",
    "GradNormLoRPAdamW8bit",
    "PerLayerUpdates",
    "WeightNormLinear",
    "apply_weight_norm",
    "merge_weight_norm",
    "projected_param_groups",
    "__version__",
]
