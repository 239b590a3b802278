"""The projected AdamW and its parameter groups."""

from gnlorp_dist.optim.adamw import GradNormLoRPAdamW, GradNormLoRPAdamW8bit
from gnlorp_dist.optim.groups import projected_param_groups

__all__ = ["GradNormLoRPAdamW", "GradNormLoRPAdamW8bit", "projected_param_groups"]
