"""GradNormLoRPAdamW under DeepSpeed ZeRO: exact per-rank bytes (CPU) and peak memory + speed (GPU).

CPU mode (default): for ZeRO stages 0-3 and 1, 2 and 4 forked gloo ranks, a LLaMA (default
``llama_60m``, fp32; rank, T and alpha from the model's recipe) trains a few steps under
``deepspeed.initialize`` with, as optimizer,

- ``gradnormlorp``: :class:`gnlorp_dist.GradNormLoRPAdamW` as DeepSpeed's client optimizer on the
  weight-normalised model (``gradnormlorp-8bit``: the same at ``bits=8``);
- ``deepspeed-adamw``: DeepSpeed's own optimizer from the config block ``"optimizer": {"type":
  "AdamW", ...}`` (``torch_adam``: ``torch.optim.AdamW`` over DeepSpeed's flat partitions; fused
  kernels need a GPU) on the plain model, no client optimizer: the usual ZeRO + AdamW baseline.

Per rank it reports exact bytes counted from the live objects after the last step:

- ``state``: every tensor in the optimizer's state (moments, 8-bit codes and scales, projection
  bases ``proj``, AdamW's 4-byte ``step`` tensors). For ours this is the client optimizer's
  ``state``; for DeepSpeed's AdamW it is the state of the torch optimizer the ZeRO wrapper holds
  (``engine.optimizer.optimizer``), keyed by the flat fp32 partitions;
- ``master``: DeepSpeed's fp32 master partition (``single_partition_of_fp32_groups`` at ZeRO 1/2,
  ``fp32_partitioned_groups_flat`` at ZeRO 3; at ZeRO 0 in fp32 the model's weights are the
  masters and no copy exists: 0);
- the SVDs each rank computed per subspace refresh (``optimizer.refresh_count``: each matrix's
  subspace is computed by one owner rank only).

The script asserts that at stages 1-3 every rank's state and master bytes shrink as ranks are
added, and that DeepSpeed's AdamW state is exactly two fp32 moments of its master partition plus
one 4-byte step tensor per flat group.

GPU mode (``--device cuda``): ZeRO-2 bf16 on ONE GPU (world size 1, in this process, via
``deepspeed.init_distributed``), ``--warmup`` untimed then ``--steps`` timed steps of ``--batch``
x ``--seq`` tokens: the peak memory of each run (``torch.cuda.max_memory_allocated`` above what was
allocated before it started) and tokens/s, for ``gradnormlorp`` at 32 and 8 bits and DeepSpeed's
own Adam (FusedAdam in AdamW mode; ``--ds-torch-adam`` for ``torch.optim.AdamW``), ratios against
DeepSpeed's. ``--device cpu --single-rank-compare`` runs the same comparison on the CPU (no peak
memory there), so the code path is exercised without a GPU.

Usage::

    python -m benchmarks.deepspeed_zero                       # CPU ZeRO table, ~16 minutes
    python -m benchmarks.deepspeed_zero --device cuda --model llama_60m --batch 8 --seq 256
    python -m benchmarks.deepspeed_zero --device cpu --single-rank-compare --model llama_nano

The measuring code is :mod:`gnlorp_dist.bench.zero` and :mod:`gnlorp_dist.bench.zero_report`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from gnlorp_dist.bench.harness import RESULTS_DIR, environment, write_json
from gnlorp_dist.bench.zero import DTYPES, OPTIMIZERS, RunSettings, import_deepspeed
from gnlorp_dist.bench.zero_report import compare_mode, zero_mode
from gnlorp_dist.models import llama_config, recipe_for_config
from gnlorp_dist.options.fields import option
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

# Defaults per mode: the ZeRO table counts bytes (few short fp32 steps are enough); the
# comparison times steps (warm-up first, bf16 as on a GPU; on the CPU short, to exercise the path).
MODE_DEFAULTS = {
    "zero": {"steps": 3, "warmup": 0, "batch": 1, "seq": 64, "dtype": "fp32"},
    "compare": {"steps": 20, "warmup": 5, "batch": 8, "seq": 256, "dtype": "bf16"},
    "compare-cpu": {"steps": 3, "warmup": 1, "batch": 1, "seq": 64, "dtype": "bf16"},
}


@dataclass(frozen=True, kw_only=True)
class ZeroBenchConfig:
    """The ZeRO byte table over stages and world sizes (CPU), or the one-rank comparison."""

    device: str = option("cpu", choices=("cpu", "cuda"))
    """cpu: the ZeRO byte table on forked gloo ranks; cuda: the comparison on one GPU."""
    single_rank_compare: bool = False
    """The GPU mode's comparison (one rank, in this process); implied by --device cuda."""
    model: str = option("llama_60m", metavar="NAME|PATH")
    """A named LLaMA or a config path."""
    optimizers: tuple[str, ...] | None = option(None, choices=OPTIMIZERS, metavar="OPTIMIZER")
    """gradnormlorp, gradnormlorp-8bit, deepspeed-adamw (default: all three)."""
    stages: tuple[int, ...] = option((0, 1, 2, 3), metavar="STAGE")
    """ZeRO stages of the table."""
    worlds: tuple[int, ...] = option((1, 2, 4), metavar="N")
    """World sizes (forked gloo ranks) of the table."""
    stage: int = 2
    """ZeRO stage of the compare mode."""
    dtype: str | None = option(None, choices=tuple(DTYPES))
    """fp32 or bf16 (default: fp32 for the table, which runs in fp32 only; bf16 to compare)."""
    steps: int | None = None
    """Timed steps (default: 3 for the table and on the CPU, 20 on a GPU)."""
    warmup: int | None = None
    """Untimed steps first (default: 0 for the table, 1 on the CPU, 5 on a GPU)."""
    batch: int | None = None
    """Micro batch per rank (default: 1; 8 on a GPU)."""
    seq: int | None = None
    """Tokens per sequence (default: 64; 256 on a GPU)."""
    threads: int | None = None
    """torch threads in this process (default: 1 for the table, every core to compare)."""
    ds_torch_adam: bool = False
    """On CUDA, DeepSpeed's AdamW as torch.optim.AdamW instead of FusedAdam."""
    json: str | None = option(None, metavar="PATH")
    """Where to write the results (default benchmarks/results/deepspeed_zero.json, or
    deepspeed_zero_<device>.json to compare)."""

    @property
    def mode(self) -> str:
        return "compare" if self.single_rank_compare or self.device == "cuda" else "zero"


def parse_args(argv: Sequence[str] | None) -> ZeroBenchConfig:
    """The command line, every default of its mode filled in; usage errors exit with status 2."""
    parser = build_parser(
        ZeroBenchConfig, prog="benchmarks.deepspeed_zero", description=__doc__.splitlines()[0]
    )
    config = config_from_namespace(ZeroBenchConfig, parse_namespace(parser, argv))
    if config.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). On a CPU, "
            "run the ZeRO byte table (no --device) or --device cpu --single-rank-compare instead."
        )
    key = "compare-cpu" if config.mode == "compare" and config.device == "cpu" else config.mode
    filled = {k: v for k, v in MODE_DEFAULTS[key].items() if getattr(config, k) is None}
    config = dataclasses.replace(config, **filled)
    if config.mode == "zero" and config.dtype != "fp32":
        parser.error("the ZeRO table runs in fp32 (bf16 adds DeepSpeed's bf16 wrappers)")
    if config.optimizers is None:
        config = dataclasses.replace(config, optimizers=OPTIMIZERS)
    if config.json is None:
        name = "deepspeed_zero" if config.mode == "zero" else f"deepspeed_zero_{config.device}"
        config = dataclasses.replace(config, json=str(RESULTS_DIR / f"{name}.json"))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    threads = config.threads or (1 if config.mode == "zero" else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    import_deepspeed(config.device)
    settings = RunSettings(
        config=llama_config(config.model), device=config.device, warmup=config.warmup,
        steps=config.steps, batch=config.batch, seq=config.seq,
        fused_adam=config.device == "cuda" and not config.ds_torch_adam,
    )  # fmt: skip
    started = time.perf_counter()
    assert config.optimizers is not None and config.dtype is not None
    if config.mode == "zero":
        report = zero_mode(config.model, config.optimizers, config.stages, config.worlds, settings)
    else:
        report = compare_mode(config.model, config.optimizers, config.stage, config.dtype, settings)
    report.update(
        benchmark="deepspeed_zero",
        model=config.model,
        settings={k: v for k, v in asdict(settings).items() if k != "config"},
        recipe=asdict(recipe_for_config(settings.config)),
        deepspeed=sys.modules["deepspeed"].__version__,
        environment=environment(),
        runtime_s=time.perf_counter() - started,
    )
    path = write_json(config.json, report)
    print(f"\n{report['runtime_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
