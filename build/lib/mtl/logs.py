"""Logging for the workflow's scripts: everything to the rule's log, errors a user can act on without a traceback.

Kept free of heavy imports so a script can call it before torch loads (import-time warnings then
land in the log too).
"""
from __future__ import annotations

import logging
import os
import sys

from mtl.errors import MTLError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_file(path: str) -> None:
    """Send stderr and logging to ``path`` (line-buffered) and report MTLError as a plain message.

    Snakemake prints a failed job's log (``--show-failed-logs``), so the message is what the user
    reads; a traceback stays for unexpected errors, where it is what a developer needs.
    The file is truncated, then written in append mode, so processes this job starts (training
    workers, see mtl.distributed) can append to the same log without overwriting each other.
    """
    open(path, "w").close()
    _send_to(open(path, "a", buffering=1), FORMAT)


def log_worker_to_file(path: str | None, prefix: str) -> None:
    """A training worker's logging: append to ``path`` (the rule's log; None: stay on stderr),
    every logging line prefixed by ``prefix`` ("rank 1/4").

    File descriptors 1 and 2 are pointed at the log as well, so tracebacks and messages from
    native code (gloo, NCCL) land there too.
    """
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    _send_to(os.fdopen(2, "w", buffering=1, closefd=False),
             FORMAT.replace("%(levelname)s", f"[{prefix}] %(levelname)s"), f"[{prefix}] ")


def _send_to(stream, fmt: str, prefix: str = "") -> None:
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, format=fmt, force=True)
    logging.captureWarnings(True)
    sys.excepthook = lambda exc_type, exc, tb: _report(exc_type, exc, tb, prefix)


def _report(exc_type, exc, tb, prefix: str = "") -> None:
    if isinstance(exc, MTLError):
        print(f"{prefix}ERROR: {exc}", file=sys.stderr)
    else:
        if prefix:
            print(f"{prefix}unexpected error, traceback follows:", file=sys.stderr)
        sys.__excepthook__(exc_type, exc, tb)
