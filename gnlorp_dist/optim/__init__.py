"""The projected AdamW, its parameter groups and per-layer updates."""

from gnlorp_dist.optim.adamw import GradNormLoRPAdamW
from gnlorp_dist.optim.adamw8bit import GradNormLoRPAdamW8bit
from gnlorp_dist.optim.groups import projected_param_groups
from gnlorp_dist.optim.per_layer import PerLayerUpdates

__all__ = [
    "GradNormLoRPAdamW",
    "GradNormLoRPAdamW8bit",
    "PerLayerUpdates",
    "projected_param_groups",
]
