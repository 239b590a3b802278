"""Weight-normalised linear layers (GradNormLoRP, design page section 1) and model surgery."""

from gnlorp_dist.nn.surgery import DEFAULT_TARGET_MODULES, apply_weight_norm, merge_weight_norm
from gnlorp_dist.nn.wegeft import WeGeFTLinear, apply_wegeft, merge_wegeft
from gnlorp_dist.nn.weight_norm import (
    NORM_EPS,
    WeightNormLinear,
    lora_direction,
    lora_row_norm,
    lora_weight_norm_linear,
    merge_lora_weight,
    merge_weight,
    row_norm,
    weight_norm_linear,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "NORM_EPS",
    "WeightNormLinear",
    "apply_weight_norm",
    "lora_direction",
    "lora_row_norm",
    "lora_weight_norm_linear",
    "merge_lora_weight",
    "merge_weight",
    "merge_weight_norm",
    "row_norm",
    "weight_norm_linear",
]
__all__ += ["WeGeFTLinear", "apply_wegeft", "merge_wegeft"]
