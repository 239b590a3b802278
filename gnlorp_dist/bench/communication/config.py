"""The options of ``python -m benchmarks.communication``: one frozen dataclass, whose fields are
its flags (:mod:`gnlorp_dist.options.parser`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gnlorp_dist.bench.communication.measure import RunSettings
from gnlorp_dist.bench.communication.schemes import MEASURED_MODELS, MODELS, SCHEMES
from gnlorp_dist.bench.harness import DTYPES, RESULTS_DIR
from gnlorp_dist.options.fields import option, shared
from gnlorp_dist.options.groups import PrecisionOptions

QUICK_WINDOW = {"warmup": 1, "steps": 2, "run_gap": 2}
"""What ``--quick`` sets: one warm-up step, two measured, a refresh every two steps."""


@dataclass(frozen=True, kw_only=True)
class CommunicationConfig:
    """Which shapes, world sizes and schemes to measure, how long each launch runs, and what to
    compute from shapes alone."""

    models: tuple[str, ...] = option(MEASURED_MODELS, choices=tuple(MODELS))
    """The shapes to measure (and to compute at each of --worlds); llama_1b and llama_7b are
    always computed, at --computed-world ranks."""
    worlds: tuple[int, ...] = (2, 4)
    """Ranks per measured launch (forked gloo processes on this machine)."""
    methods: tuple[str, ...] = option(SCHEMES, choices=SCHEMES)
    """The schemes to measure; their ratios are against ddp-adamw in the same run."""
    batch: int = 1
    """Sequences per rank per step."""
    seq: int = 32
    """Tokens per sequence."""
    dtype: str = shared(PrecisionOptions, "dtype", choices=tuple(DTYPES))
    warmup: int = 2
    """Unmeasured steps before the measured ones."""
    steps: int = 3
    """Measured steps, each in its own window."""
    run_gap: int = 3
    """Refresh gap inside the run: projected groups refresh at steps 0, run-gap, ..., so the
    measured window holds plain steps and a refresh step."""
    timeout: float = 600.0
    """Seconds per launch."""
    quick: bool = False
    """Warmup 1, 2 measured steps, run gap 2 (overrides --warmup, --steps, --run-gap)."""
    computed_only: bool = False
    """Shapes only, no run."""
    computed_world: int = 32
    """N for the 1B/7B rows (8 nodes x 4 GPUs)."""
    private_netns: bool = False
    """Root: run in a private network namespace with only lo up, so no other job's loopback
    traffic lands in the counter."""
    json: str = option(str(RESULTS_DIR / "communication.json"), metavar="PATH")
    """Where to write the results."""

    def measured_window(self) -> CommunicationConfig:
        """This config with --quick's window applied (itself without --quick); ValueError for a
        window that measures nothing."""
        config = dataclasses.replace(self, **QUICK_WINDOW) if self.quick else self
        if config.steps < 1 or config.warmup < 0 or config.run_gap < 2:
            raise ValueError(
                f"--steps {config.steps}, --warmup {config.warmup}, --run-gap "
                f"{config.run_gap}: use --steps >= 1, --warmup >= 0, --run-gap >= 2"
            )
        return config

    def refresh_may_miss(self) -> bool:
        """Whether no refresh may fall in the measured steps at this --run-gap."""
        return self.run_gap > self.warmup + self.steps - 1 or self.run_gap <= self.warmup - 1

    def run_settings(self, model: str, method: str, world: int) -> RunSettings:
        """One launch of ``method`` on ``model`` over ``world`` ranks with this window."""
        return RunSettings(
            model=model,
            method=method,
            world=world,
            batch=self.batch,
            seq=self.seq,
            warmup=self.warmup,
            steps=self.steps,
            run_gap=self.run_gap,
            dtype=self.dtype,
            timeout_s=self.timeout,
        )
