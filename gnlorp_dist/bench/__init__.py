"""``gnlorp-bench``: pre-train the same small LLaMA once per method (AdamW, 8-bit AdamW, GaLore,
galore-torch, LoRA, DoRA, GradNormLoRP, 8-bit GradNormLoRP; on request WeGeFT and VLoRP's
granular methods) and compare loss, perplexity, optimizer-state bytes, peak memory and step time;
or sweep rank / refresh gap / granularity.

:func:`run` is the programmatic entry point (a :class:`BenchConfig` in, the JSON payload out),
:func:`gnlorp_dist.bench.cli.main` the command line.
"""

from gnlorp_dist.bench.compare import run
from gnlorp_dist.bench.config import METHODS, SWEEPS, BenchConfig

__all__ = ["METHODS", "SWEEPS", "BenchConfig", "run"]
