"""``gnlorp-bench``: pre-train the same small LLaMA once per method (AdamW, 8-bit AdamW, GaLore,
galore-torch, LoRA, DoRA, GradNormLoRP, 8-bit GradNormLoRP; on request WeGeFT and VLoRP's
granular methods) and compare loss, perplexity, optimizer-state bytes, peak memory and step time;
or sweep rank / refresh gap / granularity.

:func:`run` is the programmatic entry point (a :class:`BenchConfig` in, the JSON payload out),
:func:`gnlorp_dist.bench.cli.main` the command line. The package is also the one benchmark system
of the repository: :mod:`gnlorp_dist.bench.harness` (tables, JSON, environment, timing) and
:mod:`gnlorp_dist.bench.methods` (the method registry) serve the scripts in ``benchmarks/`` too.
"""

from typing import Any

from gnlorp_dist.bench.config import METHODS, SWEEPS, BenchConfig

__all__ = ["METHODS", "SWEEPS", "BenchConfig", "run"]


def __getattr__(name: str) -> Any:
    # run() pulls in the whole training stack; the harness and the registry do not need it.
    if name == "run":
        from gnlorp_dist.bench.compare import run  # noqa: PLC0415

        return run
    raise AttributeError(f"module 'gnlorp_dist.bench' has no attribute {name!r}")
