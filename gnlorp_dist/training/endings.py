"""How a ``gnlorp-train`` run ends early: the errors that stop it, and their exit statuses.

(A stop on a signal, with its checkpoint, is :mod:`~gnlorp_dist.training.preemption`'s.)
"""

from __future__ import annotations

import torch

from gnlorp_dist.checkpoint.space import DiskFullError, is_disk_full
from gnlorp_dist.training.preflight import NotEnoughSpace
from gnlorp_dist.training.setup import Run, log


class NonFiniteStepError(RuntimeError):
    """``--on-nonfinite raise`` met a non-finite gradient: nothing was updated; the message is
    one line, the parameters are listed in the log."""


def too_many_skips_error(step: int, in_a_row: int, lr: float) -> FloatingPointError:
    return FloatingPointError(
        f"step {step}: {in_a_row} steps in a row skipped for a non-finite gradient "
        f"(--max-consecutive-skips {in_a_row}, counted across resumes); training stopped. The "
        f"run diverged or the data is bad: lower --lr (now {lr:g}; a resume takes "
        "it as --override lr=VALUE), enable or lower --grad-clip, or resume from an earlier "
        "checkpoint."
    )


def nonfinite_step_error(run: Run, step: int) -> NonFiniteStepError:
    """The one-line error of a step ``--on-nonfinite raise`` stops at; the parameters whose
    gradient (as this rank holds it) is not finite are logged in full."""
    names = [
        name
        for name, param in run.model.named_parameters()
        if param.grad is not None and not bool(torch.isfinite(param.grad).all())
    ]
    if names:
        log(f"step {step}: non-finite gradient in {len(names)} parameters: {', '.join(names)}")
    shown = f" in {len(names)} parameters ({names[0]}{', ...' if len(names) > 1 else ''}; "
    where = shown + "all listed in the log)" if names else " (found by the engine)"
    return NonFiniteStepError(
        f"step {step}: non-finite gradient{where}; the step was not taken and nothing changed "
        "(--on-nonfinite raise). Lower the learning rate (a resume takes --override lr=VALUE), "
        "enable --grad-clip or check the data; --on-nonfinite skip skips such steps"
    )


def exit_for(err: BaseException) -> tuple[int, str] | None:
    """The exit status and message of an error that ends gnlorp-train without a traceback:
    2 for what the user must change (no room to save, a full disk, a non-finite step under
    --on-nonfinite raise), 1 for a run that diverged; None for a bug (a traceback)."""
    if isinstance(err, (NotEnoughSpace, DiskFullError, NonFiniteStepError)):
        return 2, str(err)
    if is_disk_full(err):  # the final model or an engine's checkpoint ran out of space
        return 2, (
            f"disk full ({type(err).__name__}: {err}); the checkpoints already written are "
            "kept. Free space on the output folder's disk and run the same command again"
        )
    if isinstance(err, FloatingPointError):
        return 1, str(err)
    return None
