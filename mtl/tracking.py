"""Live training curves: TensorBoard event files, written while a run trains (optional).

A trainer takes ``tensorboard_dir`` (None: off) and opens its tracker with :func:`open_tracker`;
once per epoch it hands the tracker that epoch's scalars. Off, or on a rank other than 0 of a
multi-process run, the tracker does nothing. Tracking only watches: it changes no number and no
other file of a run. TensorBoard comes with the ``tracking`` extra (``pip install -e ".[tracking]"``);
:func:`require_tensorboard` says so before a run trains rather than failing in the middle of one.

Example::

    with open_tracker("tensorboard/fc100/resnet12/seed1/pretrain") as tracker:
        for epoch in ...:
            tracker.log(epoch, {"train/loss": 1.3, "val/accuracy": 0.52})

Watch with ``tensorboard --logdir tensorboard/``.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from mtl.distributed import ranks
from mtl.errors import ConfigError


class Tracker:
    """Tracking off: every call does nothing."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (tag -> value) at ``step`` (the epoch)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """Scalars into a TensorBoard event file under ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when tracking is on

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            # NaN marks "not measured this epoch" (pre-training validates every val_every epochs):
            # a gap in the curve, not a point.
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), global_step=int(step))
        # An epoch takes minutes: make it visible now rather than at SummaryWriter's next timed flush.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    """A ConfigError naming the extra to install when TensorBoard is missing."""
    if not tensorboard_available():
        raise ConfigError(
            "tracking.tensorboard is true but the tensorboard package is not installed in this "
            "environment: install the `tracking` extra (pip install -e \".[tracking]\", or pip install "
            "tensorboard), or set tracking: {tensorboard: false}.")


def open_tracker(tensorboard_dir: str | Path | None) -> Tracker:
    """A tracker writing to ``tensorboard_dir``; the no-op one when that is None or on a rank other
    than 0 (the ranks train the same model, and several writers would repeat every curve)."""
    if tensorboard_dir is None or not ranks.is_main():
        return Tracker()
    return TensorBoardTracker(tensorboard_dir)
