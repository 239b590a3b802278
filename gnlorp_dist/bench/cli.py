"""gnlorp-bench: pre-train the same small LLaMA on the same data, once per optimizer method.

    gnlorp-bench                                  # all eight methods on llama_nano (minutes, CPU)
    gnlorp-bench --methods adamw galore gradnormlorp --steps 50
    gnlorp-bench --sweep rank                     # gradnormlorp vs galore at ranks 8,16,32,64
    gnlorp-bench --sweep gap --sweep-values 10,25,50,100 --tensorboard
    gnlorp-bench --methods galore vlorp vlorp-projfactor gradnormlorp-granular --granularity 4
    gnlorp-bench --sweep granularity              # VLoRP's c = 1,2,4,8 at c * r = --rank
    gnlorp-bench --device cuda --model llama_60m --seq-len 256   # + peak GPU memory, tokens/s

Every flag is a field of :class:`gnlorp_dist.bench.config.BenchConfig`, helped by its docstring.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import sys
from typing import Any

from gnlorp_dist.bench.config import BenchConfig
from gnlorp_dist.training.config import field_docs

_TYPES = {"int": int, "float": float, "str": str}
_METAVARS = {"int": "N", "float": "X", "str": "STR"}
_LISTS = {"methods": "METHOD", "sweep_methods": "METHOD", "sweep_values": "N"}
_NEGATED = {"measure_memory"}


def _split(values: list[str]) -> list[str]:
    """``--methods a b``, ``--methods a,b`` and mixtures of both."""
    return [part for value in values for part in value.split(",") if part]


def _int_value(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--sweep-values: {text!r} is not a positive integer") from None


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`BenchConfig` field (lists: space- or comma-separated)."""
    parser = argparse.ArgumentParser(
        prog="gnlorp-bench",
        description=__doc__.split("\n\n")[0]
        + " Prints a table and writes JSON, a text log and PNG plots to --output-dir.",
    )
    docs = field_docs(BenchConfig)
    for f in dataclasses.fields(BenchConfig):
        help_text = docs.get(f.name, "").replace("%", "%%")
        flag = f"--{f.name.replace('_', '-')}"
        default = f.default
        if f.name in _NEGATED:
            parser.add_argument(
                f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                help=help_text,
            )  # fmt: skip
        elif f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.name in _LISTS:
            if isinstance(default, tuple):
                help_text += f" (default: {','.join(map(str, default))})"
            parser.add_argument(
                flag, nargs="+", default=None, metavar=_LISTS[f.name], help=help_text
            )
        else:
            base = str(f.type).split("|")[0].strip()
            if default is not None and "default" not in help_text:
                help_text += f" (default: {default})"
            parser.add_argument(
                flag, type=_TYPES[base], default=default, metavar=_METAVARS[base], help=help_text
            )
    return parser


def config_from_args(argv: list[str] | None = None) -> BenchConfig:
    """The :class:`BenchConfig` of a command line (ValueError for a bad list value)."""
    args = vars(build_parser().parse_args(argv))
    fields: dict[str, Any] = {}
    for name, value in args.items():
        if name in _LISTS:
            if value is None:
                continue
            parts = _split(value)
            fields[name] = (
                tuple(_int_value(p) for p in parts) if name == "sweep_values" else (tuple(parts))
            )
        else:
            fields[name] = value
    return BenchConfig(**fields)


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
