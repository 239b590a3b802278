"""The projected AdamW and its parameter groups."""

from gnlorp_dist.optim.adamw import GradNormLoRPAdamW
from gnlorp_dist.optim.groups import projected_param_groups

__all__ = ["GradNormLoRPAdamW", "projected_param_groups"]
