"""DeepSpeed JSON configs that work with GradNormLoRPAdamW: checks with the fix, and the fill-in.

:func:`check_deepspeed_config` refuses, before ``deepspeed.initialize``, every setting under
which our optimizer would train wrongly or that we have not tested, each with the option to use
instead; it fills in the two switches DeepSpeed needs for a client optimizer.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
from typing import Any

SUPPORTED_STAGES = (0, 1, 2, 3)
OFFLOAD_STAGES = (2, 3)

# The top-level keys DeepSpeed 0.19 reads, used when DeepSpeed is not installed and added to
# those read off the installed DeepSpeed (some sections are read only on some paths).
_STATIC_TOP_LEVEL_KEYS = frozenset(
    {
        "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint",
        "comet", "comms_logger", "communication_data_type", "compile", "compression_training",
        "csv_monitor", "curriculum_learning", "data_efficiency", "data_types",
        "dataloader_drop_last", "datastates_ckpt", "disable_allgather", "disable_python_gc",
        "dump_state", "eigenvalue", "elasticity", "expert_parallel", "flops_profiler", "fp16",
        "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
        "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
        "managed_gradient_accumulation", "memory_breakdown", "monitor_config", "nebula",
        "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
        "quantize_training", "scheduler", "seq_parallel_communication_data_type",
        "sequence_parallel_size", "sparse_attention", "sparse_gradients", "steps_per_print",
        "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size",
        "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
        "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
        "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
    }
)  # fmt: skip
# zero_optimization keys of DeepSpeed 0.19's DeepSpeedZeroConfig (field names and aliases).
_STATIC_ZERO_KEYS = frozenset(
    {
        "allgather_bucket_size", "allgather_partitions", "allgather_sequential",
        "contiguous_gradients", "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory",
        "elastic_checkpoint", "enable_sanity_checks", "gather_16bit_weights_on_model_save",
        "ignore_unused_parameters", "leaf_module", "legacy_stage1", "load_from_fp32_weights",
        "log_trace_cache_warnings", "max_live_parameters", "max_reuse_distance",
        "memory_efficient_linear", "mics_hierarchical_params_gather", "mics_shard_size",
        "model_persistence_threshold", "module_granularity_threshold", "offload_optimizer",
        "offload_param", "overlap_comm", "override_module_apply", "param_persistence_threshold",
        "parameter_alignment", "pipeline_loading_checkpoint", "prefetch_bucket_size",
        "reduce_bucket_size", "reduce_scatter", "round_robin_gradients",
        "save_muon_momentum_buffer_in_memory", "stage", "stage3_allgather_sequential",
        "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
        "stage3_max_live_parameters", "stage3_max_reuse_distance",
        "stage3_model_persistence_threshold", "stage3_module_granularity_threshold",
        "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
        "stage3_use_all_reduce_for_fetch_params", "sub_group_size", "use_all_reduce_for_fetch_params",
        "use_multi_rank_bucket_allreduce", "zenflow", "zero_hpz_partition_size",
        "zero_quantized_gradients", "zero_quantized_nontrainable_weights",
        "zero_quantized_weights", "zeropp_loco_param",
    }
)  # fmt: skip


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


class _KeyRecorder(dict):
    """A dict that remembers every key looked up in it."""

    def __init__(self, *args: Any, seen: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def __copy__(self) -> _KeyRecorder:
        return _KeyRecorder(self, seen=self.seen)


@functools.cache
def known_top_level_keys() -> frozenset[str]:
    """The top-level keys DeepSpeed knows: those the installed DeepSpeed's ``DeepSpeedConfig``
    looks up while reading a config (recorded), with a static list of DeepSpeed 0.19's keys
    (also the whole answer when DeepSpeed is not installed)."""
    seen: set[str] = set()
    try:
        from deepspeed.runtime.config import DeepSpeedConfig  # noqa: PLC0415  (slow import)

        reader = object.__new__(DeepSpeedConfig)  # no __init__: no process group, no world size
        reader.global_rank, reader.world_size = 0, 1
        minimal = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
        reader._initialize_params(_KeyRecorder(minimal, seen=seen))
    except Exception:  # noqa: BLE001, S110 - any failure: the keys seen so far and the static list
        pass
    return _STATIC_TOP_LEVEL_KEYS | {key for key in seen if isinstance(key, str)}


@functools.cache
def known_zero_keys() -> frozenset[str]:
    """The ``zero_optimization`` keys DeepSpeed knows: the field names and aliases of the
    installed DeepSpeed's ``DeepSpeedZeroConfig``, with a static list of DeepSpeed 0.19's."""
    keys: set[str] = set()
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # noqa: PLC0415

        for name, field in DeepSpeedZeroConfig.model_fields.items():
            keys.add(name)
            if field.alias:
                keys.add(field.alias)
    except Exception:  # noqa: BLE001, S110 - not installed or another version: the static list
        pass
    return _STATIC_ZERO_KEYS | keys


def check_known_keys(config: dict[str, Any]) -> None:
    """A ValueError for a top-level or ``zero_optimization`` key DeepSpeed does not know (it
    would ignore a misspelled section and train without it), with the nearest known key."""
    sections = [("", config, known_top_level_keys())]
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        sections.append(("zero_optimization.", zero, known_zero_keys()))
    for prefix, section, known in sections:
        for key in section:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"the DeepSpeed config has the key '{prefix}{key}', which DeepSpeed does not know "
                f"(it would ignore it silently); {hint}fix or remove it (see ds_configs/ for "
                "examples)"
            )


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

    Raises ValueError, naming the setting and what to use instead, for: a top-level or
    ``zero_optimization`` key DeepSpeed does not know (with the nearest known key), an
    ``optimizer`` block (ours is the client optimizer), fp16 loss scaling (use bf16), a ZeRO
    stage outside 0-3, optimizer offload at stage 0/1 or to NVMe, ZeRO++ hierarchical
    partitioning, MiCS and elastic ZeRO checkpoints (they assume optimizer states shaped like
    the flat partition), and, unless ``allow_auto`` (Accelerate and the Trainer resolve them),
    leftover ``"auto"`` values.

    Fills in ``zero_allow_untested_optimizer: true`` (stages 1-3) and, with optimizer offload,
    ``zero_force_ds_cpu_optimizer: false``: without them DeepSpeed refuses or replaces a client
    optimizer.
    """
    config = load_deepspeed_config(config)
    check_known_keys(config)
    _check_client_optimizer_fits(config)
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    device = _offload_device(zero, "offload_optimizer")
    _check_zero(zero, stage, device)
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


def _check_client_optimizer_fits(config: dict[str, Any]) -> None:
    """A ValueError for an ``optimizer`` block (ours is the client optimizer) and fp16."""
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


def _check_zero(zero: dict[str, Any], stage: Any, device: str | None) -> None:
    """A ValueError for a ``zero_optimization`` section our low-rank states do not fit:
    ``stage`` outside 0-3, optimizer offload (to ``device``) below stage 2 or to NVMe,
    ZeRO++ hierarchical partitioning, MiCS and elastic checkpoints."""
    if stage not in SUPPORTED_STAGES:
        raise ValueError(
            f"zero_optimization.stage={stage!r} is not a ZeRO stage; use one of {SUPPORTED_STAGES}"
        )
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


def initialize(*, model: Any, optimizer: Any, config: Any, **kwargs: Any) -> tuple[Any, ...]:
    """``deepspeed.initialize`` with ``config`` checked and filled by check_deepspeed_config."""
    import deepspeed  # noqa: PLC0415  (5 s; only when DeepSpeed is the engine)

    checked = check_deepspeed_config(config)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=checked, **kwargs)
