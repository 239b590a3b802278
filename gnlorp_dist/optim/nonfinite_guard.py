"""The non-finite policy of :class:`GradNormLoRPAdamW`'s ``step()``: verify, then skip or raise.

Plain functions of the step's :class:`~gnlorp_dist.optim.group_step.GroupStep` list: the one
check of a step, for every layout, in one place. Every gradient a rank consumes is counted in
one fused reduction and the verdict travels in one small all-reduce
(:func:`gnlorp_dist.optim.comm.step_verdict`), so every rank skips or raises together, before
anything changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import Communicator, step_verdict
from gnlorp_dist.optim.group_step import GroupStep
from gnlorp_dist.optim.refresh import refresh_due
from gnlorp_dist.optim.validation import (
    gradients_differ_error,
    non_finite_refresh_error,
    non_finite_step_error,
)


def verify_gradients(
    steps: list[GroupStep],
    comm: Communicator,
    *,
    skip: bool,
    known_finite: bool,
    compare_replicas: bool,
) -> bool:
    """THE check of a step: whether it may go on (False: skip it), before anything changes.

    Every gradient this rank consumes (:func:`consumed_gradients`) is checked in one fused
    count, the verdict summed over ranks (one small all-reduce, one host read) so every rank
    skips or raises together. ``skip``: a non-finite gradient skips the step (``on_nonfinite=
    "skip"``), else it raises a ValueError naming the parameters. ``known_finite``: the caller
    vouched for the gradients (:meth:`GradNormLoRPAdamW.mark_gradients_finite`): one process
    then checks nothing. ``compare_replicas`` (replicated layouts over several ranks whose
    gradients DDP averaged): the ranks' gradient checksums travel in the same all-reduce, since
    un-averaged gradients would make each owner update from its own data."""
    consumed = consumed_gradients(steps)
    if comm.world_size == 1 and (known_finite or not consumed):
        return True  # nothing to verify: no host sync
    like = steps[0].device if steps else torch.device("cpu")
    compare = comm.world_size > 1 and compare_replicas and any(s.owner_alone for s in steps)
    checked = replicated_gradients(steps) if compare else None
    non_finite, differ = step_verdict(comm, [g for _n, g in consumed], like, checked)
    if differ:
        raise gradients_differ_error(comm.world_size)
    if not non_finite:
        return True
    if skip:
        return False
    raise non_finite_error(steps, consumed)


def non_finite_error(steps: list[GroupStep], consumed: list[tuple[str, Tensor]]) -> ValueError:
    """The error path only: the ValueError naming the offenders (one host read each)."""
    due = due_matrices(steps)
    bad = list(dict.fromkeys(n for n, g in consumed if not bool(torch.isfinite(g).all())))
    steps_of = {name: taken for name, taken in matrix_steps(steps)}
    counted = sorted(steps_of[n] for n in bad if n in steps_of) or sorted(steps_of.values())
    step = counted[0] if counted else "?"
    if bad and all(n in due for n in bad):
        return non_finite_refresh_error(bad, step)
    return non_finite_step_error(bad or ["a parameter owned by another rank"], step)


def zero_non_finite_(tensor: Tensor) -> Tensor:
    """``tensor`` with its NaN and infinite entries set to zero, in place (finite values keep
    their bits). Per-layer mode's containment: its verdict comes after the updates."""
    return tensor.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def consumed_gradients(steps: list[GroupStep]) -> list[tuple[str, Tensor]]:
    """``(name, gradient)`` of everything this rank's update reads: its runs (sharded layouts),
    the whole gradient of the matrices it owns and the rows of the dense blocks it owns
    (replicated layouts)."""
    consumed = []
    for step in steps:
        for i, param in enumerate(step.params):
            if not step.active[i]:
                continue
            fragment = step.fragments[i]
            if not step.owner_alone and (step.projected or not step.layout.replicated):
                if fragment is not None:  # its run, or under low-rank reduction its own whole
                    consumed.append((param.name, fragment.grad[: fragment.numel]))
                continue
            grad = param.tensor.grad
            assert grad is not None
            for block in step.blocks[i]:
                if block.owner == step.comm.rank:
                    rows = grad if block.whole else grad[block.row_start : block.row_stop]
                    consumed.append((param.name, rows))
    return consumed


def replicated_gradients(steps: list[GroupStep]) -> list[Tensor]:
    return [
        p.tensor.grad
        for step in steps
        if step.owner_alone
        for i, p in enumerate(step.params)
        if step.active[i] and p.tensor.grad is not None
    ]


def due_matrices(steps: list[GroupStep]) -> set[str]:
    """Names of the projected matrices whose subspace this step refreshes."""
    return {
        p.name
        for step in steps
        if step.projected
        for i, p in enumerate(step.params)
        if step.active[i]
        and step.states[i] is not None
        and refresh_due(step.projection, step.state(i))
    }


def matrix_steps(steps: list[GroupStep]) -> list[tuple[str, int]]:
    return [
        (p.name, int(step.state(i).get("step", 0)))
        for step in steps
        for i, p in enumerate(step.params)
        if step.states[i] is not None
    ]
