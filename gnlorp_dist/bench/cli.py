"""gnlorp-bench: pre-train the same small LLaMA on the same data, once per optimizer method.

    gnlorp-bench                                  # all eight methods on llama_nano (minutes, CPU)
    gnlorp-bench --methods adamw galore gradnormlorp --steps 50
    gnlorp-bench --sweep rank                     # gradnormlorp vs galore at ranks 8,16,32,64
    gnlorp-bench --sweep gap --sweep-values 10,25,50,100 --tensorboard
    gnlorp-bench --methods galore vlorp vlorp-projfactor gradnormlorp-granular --granularity 4
    gnlorp-bench --sweep granularity              # VLoRP's c = 1,2,4,8 at c * r = --rank
    gnlorp-bench --device cuda --model llama_60m --seq-len 256   # + peak GPU memory, tokens/s
    gnlorp-bench --config sweep.yaml --steps 40   # options from a YAML/JSON file, flags win

Every flag is a field of :class:`gnlorp_dist.bench.config.BenchConfig`, helped by its docstring.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

from gnlorp_dist.bench.config import BenchConfig
from gnlorp_dist.options.parser import build_parser as build_options_parser
from gnlorp_dist.options.parser import config_from_namespace, parse_namespace


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`BenchConfig` field (lists: space- or comma-separated)."""
    return build_options_parser(
        BenchConfig,
        prog="gnlorp-bench",
        description=__doc__.split("\n\n")[0]
        + " Prints a table and writes JSON, a text log and PNG plots to --output-dir.",
    )


def config_from_args(argv: list[str] | None = None) -> BenchConfig:
    """The :class:`BenchConfig` of a command line (ValueError for a bad list value)."""
    return config_from_namespace(BenchConfig, parse_namespace(build_parser(), argv))


def keep_freed_memory_for_reuse() -> bool:
    """On glibc, keep freed blocks up to 1 GiB in the heap instead of returning them to the OS.

    Why: every step allocates and frees the logits (batch x seq x 32000 floats, 64 MiB at the
    defaults); above glibc's mmap threshold each one is a fresh mmap that the kernel zero-fills
    page by page, which was a third of the run's CPU time. Same for every method, so ratios do
    not change; only the command line does it (it is process-wide). False where unavailable.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(
            libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the allocator's defaults
        return False


def main(argv: list[str] | None = None) -> int:
    """The command line; user mistakes and missing optional packages exit with status 2."""
    from gnlorp_dist.bench.compare import run

    parser = build_parser()
    keep_freed_memory_for_reuse()
    try:
        run(config_from_args(argv))
    except (ValueError, ModuleNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
