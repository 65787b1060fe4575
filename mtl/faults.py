"""Test hook: faults at named points of a real run, for the fault suite (tests/test_faults.py).

Long runs are killed, preempted and meet full disks at arbitrary moments; the fault suite needs
those moments at chosen, repeatable points of the real workflow. The library calls
``fault_point(name)`` at a few places (a training step, a file about to take its final name). In
normal use the environment variable below is unset and the call returns at once: it changes
nothing and costs one dictionary lookup. Never set it outside the tests.

``MTL_FAULT_AT="<point>[#<n>]=<action>"`` fires at the n-th time (default the first) this process
reaches ``<point>``; ``MTL_FAULT_DIR`` (required) is a folder where the hook writes ``fired`` when
it fires and which makes it fire once only: a rerun or a requeued job with the same environment
then runs clean. Points: ``pretrain.step`` and ``meta.step`` (after each optimiser step),
``digits.export`` (after each class folder of the demo's "download"), and ``write:<file name>``
(an atomic write whose temporary file is complete, just before it is renamed into place).
Actions:

- ``kill``: SIGKILL this process (the OOM killer, one job lost);
- ``kill-all``: SIGKILL this process's group, so Snakemake and every job die too (a lost session
  or machine); the test starts Snakemake in a group of its own;
- ``term``: SIGTERM this process (a scheduler's time limit, preemption or ``scancel``);
- ``cut`` / ``cut-all`` (write points only): truncate the file being written to half its size,
  then as ``kill`` / ``kill-all``: a kill in the middle of the write;
- ``stall``: wait (at most ten minutes) until ``<MTL_FAULT_DIR>/release`` exists or a stop is
  requested, so a test can act on a run that is busy at a known point.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

from mtl.stop_signals import stop_requested

FAULT_ENV = "MTL_FAULT_AT"
FAULT_DIR_ENV = "MTL_FAULT_DIR"
ACTIONS = ("kill", "kill-all", "term", "cut", "cut-all", "stall")
STALL_LIMIT_S = 600

_reached: Counter = Counter()


def fault_point(name: str, path: str | os.PathLike | None = None) -> None:
    """Fire the configured fault if this is its point and occurrence; ``path``: the file being written."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, count, action = parse_spec(spec)
    if name != point:
        return
    key = (spec, os.environ.get(FAULT_DIR_ENV))  # counted per fault, so tests in one process stay apart
    _reached[key] += 1
    if _reached[key] != count or not _claim_once():
        return
    _fire(action, path)


def parse_spec(spec: str) -> tuple[str, int, str]:
    """``"pretrain.step#5=term"`` -> ("pretrain.step", 5, "term"); a bad spec is an error, not a no-op."""
    where, _, action = spec.partition("=")
    point, _, count = where.partition("#")
    if not point or action not in ACTIONS or (count and not count.isdigit()):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <point>[#<n>]=<action>, action one of {ACTIONS}")
    return point, int(count or 1), action


def _claim_once() -> bool:
    """True the first time any process fires for this ``MTL_FAULT_DIR`` (an exclusive create)."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        raise ValueError(f"{FAULT_ENV} is set but {FAULT_DIR_ENV} is not; the hook needs a folder")
    try:
        os.close(os.open(Path(folder) / "fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _fire(action: str, path) -> None:
    if action.startswith("cut"):
        if path is None:
            raise ValueError(f"{FAULT_ENV}: '{action}' needs a write point (write:<file name>)")
        os.truncate(path, os.path.getsize(path) // 2)
    if action in ("kill", "cut"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("kill-all", "cut-all"):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "stall":
        _stall(Path(os.environ[FAULT_DIR_ENV]) / "release")


def _stall(release: Path) -> None:
    deadline = time.monotonic() + STALL_LIMIT_S
    while not release.exists() and not stop_requested() and time.monotonic() < deadline:
        time.sleep(0.1)
