"""Training-step time of galore, gradnormlorp and galore-torch as a ratio to torch.optim.AdamW.

Every method trains its own copy of the same small model (same seed, same weights) on the same
random-token batches in ONE process; the methods take turns step by step (the order rotating),
so drift in the machine's speed hits all of them alike. Warm-up steps are dropped. Subspace
refreshes happen only at the steps ``k`` with ``k % refresh_gap == 0``; those steps are timed
apart from the others, and the ratio to AdamW is taken over the steps where no method refreshes.
Then, on the gradients of one backward pass, the pure SVD cost of a refresh
(``compute_projection`` summed over the model's projected matrices) is timed for the full SVD and
the randomized range finder, with the randomized one's subspace error. The measuring code is
:mod:`gnlorp_dist.bench.step_times`.

    python -m benchmarks.step_time                       # llama_nano, fp32, all threads
    python -m benchmarks.step_time --model llama_micro --threads 1
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from gnlorp_dist.bench.harness import write_json
from gnlorp_dist.bench.step_times import NAME, QUICK, StepTimeConfig, run, tables
from gnlorp_dist.options.parser import build_parser, config_from_namespace, parse_namespace

__all__ = ["QUICK", "main"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(
        StepTimeConfig, prog=f"benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    config = config_from_namespace(StepTimeConfig, parse_namespace(parser, argv)).resolved()
    if any(m.startswith("galore-torch") for m in config.methods):
        try:
            import galore_torch  # noqa: F401, PLC0415
        except ImportError:
            print("galore-torch is not installed (pip install galore-torch==1.0); skipping it")
            methods = tuple(m for m in config.methods if m != "galore-torch")
            config = dataclasses.replace(config, methods=methods)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    payload = run(config)
    payload["seconds"] = round(time.perf_counter() - started, 1)
    print(tables(payload))
    path = write_json(config.json, payload)
    print(f"\nwrote {path} ({payload['seconds']} s)")
    return payload


if __name__ == "__main__":
    main()
