"""Preemption: SIGTERM, SIGUSR1 and SIGINT stop every rank at one step, after a checkpoint.

A cluster sends SIGTERM (Kubernetes, SLURM at the time limit, torchrun forwarding its own) or
the signal a job asked for ahead of the kill (SLURM's ``--signal=USR1@120``) before it kills a
job; Ctrl-C sends SIGINT. :func:`stop_signals` installs handlers that only record the signal,
so the optimizer step under way always finishes. After each step :class:`StopVote` says
whether the job stops there; the loop then writes the normal checkpoint (manifest and all) and
raises :class:`Preempted`, which ``gnlorp-train`` turns into one line and exit status
:data:`EXIT_PREEMPTED`.

Several ranks must agree on the step, although a signal may reach only some of them (SLURM
signals every task, torchrun forwards only the signals it handles, a user may ``kill`` one
pid). The vote is one 1-element all-reduce (sum of the ranks' flags) per step, started after the
step and read after the next one, so it never adds a host sync: on the CPU (gloo) the result is
plain host memory; on a GPU it is copied to pinned host memory behind the all-reduce and the
next step's own loss read has already waited for it (a CUDA event confirms it). The price is
latency: every rank stops at the end of the step after the one during which the first rank was
signalled. One process needs no vote: it stops at the end of the step under way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from gnlorp_dist.optim.comm import Communicator

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a signal after writing its checkpoint: ``EX_TEMPFAIL`` of
``sysexits.h`` ("temporary failure, retry later"). Not 0: the run is unfinished, so a scheduler
must not count it as done. Not 128 + N (143 for SIGTERM): a shell reports that for a process the
signal killed, checkpoint or not, and a requeue script must tell "saved, resume me" apart."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after ``step``, with its checkpoint written."""

    def __init__(self, message: str, *, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class StopSignals:
    """The stop signals this process received (names, in order); what the handlers record."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.stopping = False
        """Set once the ranks agreed to stop: a later signal is only acknowledged."""

    def record(self, signum: int, frame: object = None) -> None:
        """The handler: record the signal and nothing else (the step under way finishes)."""
        del frame
        self.received.append(signal.Signals(signum).name)
        if self.stopping or len(self.received) > 1:
            # os.write, not print: a handler may run inside a print, whose buffer is locked.
            os.write(
                2,
                f"gnlorp-train: {self.received[-1]} again: ignored; the run stops after the "
                "current step once its checkpoint is written\n".encode(),
            )


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Record SIGTERM, SIGUSR1 and SIGINT in the yielded :class:`StopSignals` while inside;
    the previous handlers come back on exit (an in-process caller, pytest included, keeps its
    Ctrl-C). Outside the main thread Python cannot install handlers: nothing is recorded."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop.record) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopVote:
    """After each step, whether every rank stops there (the module docstring has the scheme).

    :meth:`after_step` must be called by every rank after every step, with the same
    ``last`` flag, so the all-reduces pair up."""

    def __init__(self, stop: StopSignals | None, communicator: Communicator | None) -> None:
        self.stop = stop
        self.communicator = communicator
        self.signalled_ranks = 0
        """Ranks that had a signal when the vote that stopped the run was taken."""
        self._flag: torch.Tensor | None = None
        self._handle: object = None
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def after_step(self, *, last: bool) -> bool:
        """True when every rank stops after this step; starts the next vote unless ``last``."""
        if self.stop is None:
            return False
        if self.communicator is None:
            self.signalled_ranks = int(bool(self.stop.received))
            return bool(self.signalled_ranks)
        self.signalled_ranks = self._read_previous()
        stopping = self.signalled_ranks > 0
        if not (stopping or last):
            self._start()
        return stopping

    def _start(self) -> None:
        comm = self.communicator
        assert comm is not None and self.stop is not None
        device = getattr(comm, "device", torch.device("cpu"))
        self._flag = torch.tensor([float(bool(self.stop.received))], device=device)
        self._handle = comm.all_reduce_sum(self._flag)
        if self._flag.device.type == "cuda":
            # Queue the result's copy to the host behind the all-reduce (no host wait now).
            self._handle_wait()
            self._host = torch.empty(1, device="cpu", pin_memory=True)  # the host, by design
            self._host.copy_(self._flag, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _handle_wait(self) -> None:
        if self._handle is not None:
            self._handle.wait()  # type: ignore[attr-defined]
            self._handle = None

    def _read_previous(self) -> int:
        """The previous vote's sum (0 before the first); on a GPU the step just read its loss,
        so the event has passed and ``synchronize`` returns at once."""
        if self._flag is None:
            return 0
        self._handle_wait()
        if self._copied is not None and self._host is not None:
            self._copied.synchronize()
            value = self._host
        else:
            value = self._flag
        self._flag = self._host = self._copied = None
        return round(float(value[0]))


def stop_message(stop: StopSignals, vote: StopVote, world_size: int, step: int) -> str:
    """Which signal stops the run at ``step``, as the log says it."""
    if stop.received:
        what = f"{stop.received[0]} on this rank"
    else:
        what = "a stop signal on another rank"
    if world_size > 1:
        what += f" ({vote.signalled_ranks} of {world_size} ranks signalled)"
    return f"stopping after step {step}: {what}"
