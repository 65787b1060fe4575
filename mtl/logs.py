"""Logging for the workflow's scripts: everything to the rule's log, errors a user can act on without a traceback.

Kept free of heavy imports so a script can call it before torch loads (import-time warnings then
land in the log too).
"""
from __future__ import annotations

import logging
import sys

from mtl.errors import MTLError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_file(path: str) -> None:
    """Send stderr and logging to ``path`` (line-buffered) and report MTLError as a plain message.

    Snakemake prints a failed job's log (``--show-failed-logs``), so the message is what the user
    reads; a traceback stays for unexpected errors, where it is what a developer needs.
    """
    stream = open(path, "w", buffering=1)
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, format=FORMAT, force=True)
    logging.captureWarnings(True)
    sys.excepthook = _report


def _report(exc_type, exc, tb) -> None:
    if isinstance(exc, MTLError):
        print(f"ERROR: {exc}", file=sys.stderr)
    else:
        sys.__excepthook__(exc_type, exc, tb)
