"""DeepSpeed JSON configs that work with GradNormLoRPAdamW: checks with the fix, and the fill-in.

:func:`check_deepspeed_config` refuses, before ``deepspeed.initialize``, every setting under
which our optimizer would train wrongly or that we have not tested, each with the option to use
instead; it fills in the two switches DeepSpeed needs for a client optimizer.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

SUPPORTED_STAGES = (0, 1, 2, 3)
OFFLOAD_STAGES = (2, 3)


def load_deepspeed_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a dict (a copy), from a dict or a JSON file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config {path!r} does not exist; see ds_configs/ for examples")
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {err}") from err


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled") not in (False, "false", None)


def _offload_device(zero: dict[str, Any], key: str) -> str | None:
    section = zero.get(key)
    if not isinstance(section, dict):
        return None
    device = section.get("device", "none")
    return None if device in (None, "none") else str(device)


def unresolved_auto(config: Any, path: str = "") -> list[str]:
    """Dotted paths of the ``"auto"`` values left in ``config``."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            found += unresolved_auto(value, f"{path}.{key}" if path else key)
    elif config == "auto":
        found.append(path)
    return found


def check_deepspeed_config(
    config: str | os.PathLike | dict[str, Any], *, allow_auto: bool = False
) -> dict[str, Any]:
    """``config`` checked for GradNormLoRPAdamW as DeepSpeed's client optimizer, filled in.

    Raises ValueError, naming the setting and what to use instead, for: an ``optimizer`` block
    (ours is the client optimizer), fp16 loss scaling (use bf16), a ZeRO stage outside 0-3,
    optimizer offload at stage 0/1 or to NVMe, ZeRO++ hierarchical partitioning, MiCS and
    elastic ZeRO checkpoints (they assume optimizer states shaped like the flat partition), and,
    unless ``allow_auto`` (Accelerate and the Trainer resolve them), leftover ``"auto"`` values.

    Fills in ``zero_allow_untested_optimizer: true`` (stages 1-3) and, with optimizer offload,
    ``zero_force_ds_cpu_optimizer: false``: without them DeepSpeed refuses or replaces a client
    optimizer.
    """
    config = load_deepspeed_config(config)
    if "optimizer" in config:
        kind = config["optimizer"].get("type") if isinstance(config["optimizer"], dict) else None
        raise ValueError(
            f"the DeepSpeed config names an optimizer ({kind!r}) but GradNormLoRPAdamW is passed "
            "as the client optimizer: DeepSpeed would train with one of them only. Delete the "
            '"optimizer" block (keep lr and betas in GradNormLoRPAdamW\'s arguments)'
        )
    if _enabled(config.get("fp16")):
        raise ValueError(
            '"fp16": {"enabled": true} is not supported with GradNormLoRPAdamW (fp16 loss '
            'scaling is untested with subspace refreshes); use "bf16": {"enabled": true}'
        )
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise ValueError(
            f"zero_optimization.stage={stage!r} is not a ZeRO stage; use one of {SUPPORTED_STAGES}"
        )
    device = _offload_device(zero, "offload_optimizer")
    if device is not None and stage not in OFFLOAD_STAGES:
        raise ValueError(
            f"zero_optimization.offload_optimizer at stage {stage} is not supported; use stage 2 "
            "or 3 with offload_optimizer (ds_configs/zero2_offload.json, zero3_offload.json)"
        )
    for key in ("offload_optimizer", "offload_param"):
        if _offload_device(zero, key) not in (None, "cpu"):
            raise ValueError(
                f"zero_optimization.{key}.device={zero[key]['device']!r} is not supported: "
                "DeepSpeed's NVMe swapper does not know GradNormLoRP's low-rank states; use "
                '"cpu"'
            )
    if zero.get("zero_hpz_partition_size", 1) not in (1, "auto") or zero.get(
        "mics_shard_size", -1
    ) not in (-1, 0):
        raise ValueError(
            "ZeRO++ hierarchical partitioning (zero_hpz_partition_size) and MiCS "
            "(mics_shard_size) change which rank holds which run of a matrix and are not "
            "supported; remove them"
        )
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "zero_optimization.elastic_checkpoint assumes optimizer states shaped like the flat "
            "partition, which low-rank states are not; remove it and resume at another world "
            "size with gnlorp_dist.integrations.deepspeed.checkpoint.initialize_from_checkpoint"
        )
    if not allow_auto:
        auto = unresolved_auto(config)
        if auto:
            raise ValueError(
                f'the DeepSpeed config still has "auto" values at {auto}: Accelerate and the '
                "transformers Trainer fill them; for deepspeed.initialize give numbers (gnlorp-"
                "train --deepspeed fills them from its flags)"
            )
    if stage >= 1:
        config["zero_allow_untested_optimizer"] = True
    if device is not None:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def fill_auto_values(
    config: dict[str, Any],
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    bf16: bool,
) -> dict[str, Any]:
    """A copy of ``config`` with the ``"auto"`` values Accelerate and the Trainer would fill,
    taken from a training run's own settings; explicit values must agree with them."""
    config = copy.deepcopy(config)
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise ValueError(
                f"the DeepSpeed config sets {key}={given!r} but the run uses {value!r}; set it "
                'to "auto" or make the two agree'
            )
    section = config.setdefault("bf16", {"enabled": "auto"})
    if section.get("enabled", "auto") == "auto":
        section["enabled"] = bf16
    elif bool(section["enabled"]) != bf16:
        raise ValueError(
            f"the DeepSpeed config sets bf16.enabled={section['enabled']!r} but the run uses "
            f'{"bf16" if bf16 else "fp32"}; set it to "auto" or pass the matching --dtype'
        )
    return config
