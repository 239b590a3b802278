"""gnlorp_dist: GradNormLoRP (gradient weight-normalized low-rank projection) training.

The public API and nothing else; see README.md.
"""

# Registers the default communicator and the DeepSpeed ZeRO and FSDP2 layouts with the optimizer
# (cheap: none imports DeepSpeed, and torch.distributed is part of torch).
import gnlorp_dist.distributed  # noqa: E402, F401
import gnlorp_dist.integrations.deepspeed  # noqa: E402, F401
import gnlorp_dist.integrations.fsdp2  # noqa: E402, F401
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
