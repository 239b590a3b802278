"""Fault injection for tests: kill the process at a named point, through an environment hook.

``GNLORP_FAULT=<point>[@<step>]`` makes :func:`fault_point` send SIGKILL to this process when the
named point is reached (at that optimizer step, if given). Points are placed where a crash is
interesting for checkpoint safety: between the files of a checkpoint, before its rename, after a
training step. With the variable unset, :func:`fault_point` is a dictionary lookup and nothing
else, so the hooks stay in production code.

Points: ``train.after_step``, ``checkpoint.after_optimizer``, ``checkpoint.after_model``,
``checkpoint.before_rename``, ``checkpoint.after_rename``.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "GNLORP_FAULT"
POINTS = (
    "train.after_step",
    "checkpoint.after_optimizer",
    "checkpoint.after_model",
    "checkpoint.before_rename",
    "checkpoint.after_rename",
)


def parse_fault(spec: str) -> tuple[str, int | None]:
    """``(point, step or None)`` from ``point[@step]``; ValueError for an unknown point."""
    point, _, step = spec.partition("@")
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown point {point!r}; use one of {POINTS}")
    if step and not step.isdigit():
        raise ValueError(f"{ENV_VAR}={spec!r}: the step after '@' must be a number")
    return point, int(step) if step else None


def check_fault_env() -> None:
    """ValueError now when ``GNLORP_FAULT`` is set to an unknown point or a bad step (called
    before a run starts: a misspelt point would otherwise fail only when a point is reached,
    after the first step)."""
    spec = os.environ.get(ENV_VAR)
    if spec:
        parse_fault(spec)


def fault_point(point: str, step: int | None = None) -> None:
    """Kill this process with SIGKILL if ``GNLORP_FAULT`` names ``point`` (at ``step``)."""
    assert point in POINTS, point
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    wanted, wanted_step = parse_fault(spec)
    if wanted == point and (wanted_step is None or wanted_step == step):
        os.kill(os.getpid(), signal.SIGKILL)
