"""Bytes on the wire per optimizer step: DDP + AdamW, ZeRO-2 + AdamW, GradNormLoRP uncompressed
and with low-rank gradient communication (issue #13).

The schemes, the two measurements (the loopback byte counter and the counted payload of every
collective, on forked gloo ranks with ``GLOO_SOCKET_IFNAME=lo``), the computed rows (payloads
from shapes, wire bytes with the ring model) and the calibration are
:mod:`gnlorp_dist.bench.communication`'s; this script parses the flags
(:class:`~gnlorp_dist.bench.communication.config.CommunicationConfig`), prints the tables and
writes the JSON. See benchmarks/README.md, "communication.py".

Usage::

    python -m benchmarks.communication                       # 3 models x 2 and 4 ranks
    python -m benchmarks.communication --models llama_nano --worlds 2 --quick
    python -m benchmarks.communication --computed-only       # shapes only, seconds
    python -m benchmarks.communication --private-netns       # root: a private loopback
"""

from __future__ import annotations

import sys
import time
from typing import Any

from gnlorp_dist.bench.communication.config import CommunicationConfig
from gnlorp_dist.bench.communication.report import (
    computed_section,
    measured_section,
    rerun_in_private_netns,
)
from gnlorp_dist.bench.harness import environment, write_json
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

EPILOG = (
    "--dtype bf16: zero2-adamw is skipped (measured in fp32 only); DDP all-reduces bf16 gradients."
)


def parse_config(argv: list[str]) -> CommunicationConfig:
    """The options of ``argv`` (and of a ``--config`` file), --quick applied; a window that
    measures nothing is a usage error."""
    parser = build_parser(
        CommunicationConfig,
        prog="python -m benchmarks.communication",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
    )
    config = config_from_namespace(CommunicationConfig, parse_namespace(parser, argv))
    try:
        return config.measured_window()
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    config = parse_config(raw)
    if config.private_netns:
        code = rerun_in_private_netns("benchmarks.communication", raw)
        if code is not None:
            return code
    if config.refresh_may_miss():
        print(f"note: with --run-gap {config.run_gap} no refresh may fall in the measured steps")
    started = time.perf_counter()
    record: dict[str, Any] = {"benchmark": "communication", "environment": environment()}
    entries, blocks, computed = computed_section(config)
    record.update(entries)
    print("\n".join(blocks))
    if config.computed_only:
        write_json(config.json, record)
        print(f"\nwrote {config.json}")
        return 0
    entries, blocks = measured_section(config, computed, log=print)
    record.update(entries)
    print("\n".join(blocks))
    record["elapsed_s"] = time.perf_counter() - started
    write_json(config.json, record)
    print(f"\nwrote {config.json} ({record['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
