"""Stop at the next safe point on SIGTERM or SIGINT, with the work so far saved.

Schedulers end jobs with SIGTERM and kill them a little later: Slurm on a time limit, on
preemption, on ``scancel`` and on ``scontrol requeue`` (SIGKILL after ``KillWait``, 30 s by
default); Kubernetes and most batch systems alike; Ctrl-C sends SIGINT. The training loops run
inside ``with stop_on_signals():`` and call ``stop_requested()`` after each optimiser step (the
safe point: weights, optimiser and data position agree). When it is true they save a checkpoint of
exactly that point and raise :class:`Stopped`, which ends the job non-zero within one step, well
inside a grace period, with a message saying how to resume. A second signal ends the process at
once, the default way, for a user who really means it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from mtl.errors import MTLError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: int | None = None


class Stopped(MTLError):
    """Training stopped on a signal after saving a checkpoint; rerunning the workflow resumes it."""


def stop_requested() -> bool:
    return _requested is not None


def note_stop_elsewhere() -> None:
    """Another process of this training got the signal: stop here too, at the same step."""
    global _requested
    if _requested is None:
        _requested = signal.SIGTERM


def raise_if_stop_requested(what: str, where: str, checkpoint) -> None:
    """Call right after saving ``checkpoint`` at a safe point: end the run if a signal came."""
    if _requested is not None:
        raise Stopped(f"{what} stopped by {signal.Signals(_requested).name} {where}; {checkpoint} holds this "
                      "point. Run the same snakemake command again to resume from it.")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT only set the stop flag (a second one acts as usual).

    Outside the main thread (where Python cannot install handlers) the block changes nothing.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = None
    previous = {signum: signal.signal(signum, _note_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested = None


def _note_signal(signum: int, frame) -> None:
    global _requested
    if _requested is not None:  # the second signal: stop now, as without a handler
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    _requested = signum


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals every process of a job, and a worker that
    died of it would crash the main process before its checkpoint; workers end with the loader."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
