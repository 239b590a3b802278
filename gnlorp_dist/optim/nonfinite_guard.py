"""The non-finite policy of :class:`GradNormLoRPAdamW`'s ``step()``: verify, then skip or raise.

A mixin, like :class:`~gnlorp_dist.optim.per_layer_step.PerLayerStep`: it reads the optimizer's
ownership plan, communicator and state, and keeps the one check of a step in one place. Every
gradient block a rank updates is counted in one fused reduction and the verdict travels in one
small all-reduce (:func:`gnlorp_dist.optim.comm.step_verdict`), so every rank skips or raises
together, before anything changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.comm import step_verdict
from gnlorp_dist.optim.validation import (
    check_non_finite_policy,
    gradients_differ_error,
    non_finite_error,
    non_finite_step_error,
)


class NonFiniteGuard:
    """``on_nonfinite``, ``mark_gradients_finite`` and the step's gradient verification."""

    # Provided by GradNormLoRPAdamW.
    comm: Any
    state: Any
    reduce_gradients: bool
    skipped_steps: int
    last_step_skipped: bool
    _check_non_finite: bool
    _gradients_known_finite: bool
    _on_nonfinite: str

    @property
    def on_nonfinite(self) -> str:
        """``"raise"`` or ``"skip"``: what ``step()`` does with a non-finite gradient."""
        return self._on_nonfinite

    @on_nonfinite.setter
    def on_nonfinite(self, policy: str) -> None:
        self._on_nonfinite = check_non_finite_policy(policy)

    def mark_gradients_finite(self) -> None:
        """The caller knows every gradient of the next ``step()`` is finite (e.g. the total norm
        ``clip_grad_norm_`` returned is finite): on one process that step skips its own check
        (and its host sync). Several ranks still run their verdict (it carries the checksums)."""
        self._gradients_known_finite = True

    def _skip_step(self) -> None:
        """``on_nonfinite="skip"``: nothing changed; count it (every rank reaches this together)."""
        self.skipped_steps += 1
        self.last_step_skipped = True

    def _consumed_gradients(
        self, work: list[tuple[dict[str, Any], Tensor, str]]
    ) -> list[tuple[dict[str, Any], Tensor, str, Tensor]]:
        """``(group, param, name, gradient rows)`` for every block this rank will update."""
        consumed = []
        for group, param, name in work:
            assert param.grad is not None
            for block in self.ownership()[param]:
                if block.owner == self.comm.rank:
                    rows = (
                        param.grad if block.whole else param.grad[block.row_start : block.row_stop]
                    )
                    consumed.append((group, param, name, rows))
        return consumed

    def _verify_gradients(
        self, work: list[tuple[dict[str, Any], Tensor, str]], known_finite: bool
    ) -> bool:
        """Phase 1c: whether the step may go on (False: skip it), before anything changes.

        Every gradient block this rank updates is checked (one fused count), the verdict summed
        over ranks (one small all-reduce, one host read) so every rank skips or raises together.
        Over several ranks with DDP-averaged gradients (``reduce_gradients=False``) the same
        all-reduce also compares the ranks' gradient checksums: un-averaged gradients would
        make each owner update from its own rank's data alone."""
        due = [
            (group, param, name)
            for group, param, name in work
            if "rank" in group and self.owns(param) and self._refresh_due(group, param)
        ]
        if self._check_non_finite:
            consumed = self._consumed_gradients(work)
        else:  # the benchmark's baseline: what was checked before the policy (refreshes only)
            consumed = [(g, p, n, p.grad) for g, p, n in due]
        if self.comm.world_size == 1 and (known_finite or not consumed):
            return True  # nothing to verify: no host sync
        like = work[0][1].device if work else torch.device("cpu")
        compare = self.comm.world_size > 1 and not self.reduce_gradients
        checked = [param.grad for _group, param, _name in work] if compare else None
        tensors = [rows for *_rest, rows in consumed]
        non_finite, differ = step_verdict(self.comm, tensors, like, checked)
        if differ:
            raise gradients_differ_error(self.comm.world_size)
        if not non_finite:
            return True
        if self.on_nonfinite == "skip":
            return False
        # The error path only: name the offenders (one host read each).
        bad = [(p, n) for _g, p, n, rows in consumed if not bool(torch.isfinite(rows).all())]
        names = list(dict.fromkeys(n for _p, n in bad))
        due_params = {p for _g, p, _n in due}
        if bad and all(p in due_params for p, _n in bad):
            raise non_finite_error(names, self.state, [(None, p, n) for p, n in bad])
        counted = [p for p, _n in bad] or [p for _g, p, _n, _rows in consumed]
        steps = sorted({int(self.state[p].get("step", 0)) for p in counted if p in self.state})
        raise non_finite_step_error(
            names or ["a parameter owned by another rank"], steps[0] if steps else "?"
        )
