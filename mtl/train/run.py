"""The training-run skeleton both trainers share: resume, history, best epoch, divergence, stop.

A trainer (:class:`mtl.train.pretrain.PretrainTrainer`, :class:`mtl.train.meta.MetaTrainer`)
owns its model, optimiser and data and trains and validates one epoch at a time (the
:class:`Trainer` protocol below). :class:`TrainingRun` keeps what lasts across epochs and restarts
(the history, the best epoch, the place a stopped epoch resumes from) in one atomic checkpoint,
and :func:`fit` runs the epochs: after each one the checkpoint is replaced, TensorBoard given the
epoch's scalars (one call per epoch), the history file rewritten (pre-training; meta-training writes
it with its model, at the end) and a stop signal obeyed.

Epochs are numbered from 1 everywhere here: history rows, messages and checkpoints.

Checkpoint ``<checkpoint_dir>/last.pt`` (plain values and tensors, see :mod:`mtl.train.checkpoint`)::

    {"format": 2, "identity": ..., "config": ..., "epochs_done": int, "history": [row, ...],
     "best": {"val_acc", "epoch", "state"}, "trainer": trainer.state(), "rng": ...,
     "partial": None or {"epoch": the stopped epoch, "step": ..., and the trainer's own place}}

Checkpoints written before this layout (each trainer had its own) are read too: see `_upgrade`.
A checkpoint resumes only a run with the same ``identity`` (settings, data, encoder); anything else
is refused with the differences listed, since mixing two runs would silently corrupt results.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from mtl.distributed import ranks
from mtl.errors import CheckpointError, MTLError
from mtl.io import atomic_path
from mtl.stop_signals import note_stop_elsewhere, raise_if_stop_requested, stop_on_signals, stop_requested
from mtl.tracking import open_tracker
from mtl.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

CHECKPOINT_FORMAT = 2


class Trainer(Protocol):
    """What :func:`fit` and :class:`TrainingRun` need of a trainer."""

    def run_epoch(self, epoch: int, resume: dict | None = None, on_stop=None) -> dict:
        """Train and validate epoch ``epoch``; its history row ("epoch", "val_acc", ...; not "seconds").

        ``resume``: the place a stopped run of this epoch saved. ``on_stop(place, where)``: to call
        after a step once :func:`stop_agreed` is true; it saves ``place`` and ends the run.
        """

    def state(self) -> dict:
        """Model, optimiser, ... as the checkpoint's ``trainer`` entry."""

    def load_state(self, state: dict) -> None: ...

    def keep(self) -> dict:
        """A CPU copy of what the best epoch keeps (the encoder, or the model and learner init)."""

    def scalars(self, row: dict) -> dict[str, float]:
        """The TensorBoard scalars of an epoch's row (with "seconds")."""


def stop_agreed(device) -> bool:
    """True on every process once any of them got SIGTERM/SIGINT: they must stop at the same step."""
    return ranks.any_rank(stop_requested(), device)


def check_finite(value: float, *, what: str, where: str, quantity: str, advice: str) -> None:
    """A NaN/inf loss poisons every weight it reaches: stop before it is applied or saved."""
    if not math.isfinite(value):
        raise MTLError(f"{what} diverged {where} ({quantity} {value}); {advice} and rerun. Nothing diverged "
                       "was saved: the checkpoint, if any, holds the last point before it.")


def check_identity(saved: dict, current: dict, path: Path, what: str) -> None:
    """Refuse to resume a checkpoint written by a run with other settings, data or encoder."""
    differ = _differences(saved, current)
    if differ:
        raise CheckpointError(
            f"checkpoint {path} belongs to another {what} run: {'; '.join(differ[:5])}. Delete the folder "
            f"{path.parent} to start this run from scratch, or restore the settings it was made with.")


def _differences(saved, current, prefix: str = "") -> list[str]:
    """Human-readable 'key: checkpoint X vs now Y' for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint {saved!r} vs now {current!r}"]


def write_history(path, rows: list[dict], columns) -> None:
    """The history CSV: one row per epoch; numbers as Python writes them (no digit lost), an empty
    cell where nothing was measured (NaN: an epoch pre-training did not validate)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row[key]) for key in columns})


def _csv_value(value):
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    return value


class TrainingRun:
    """One run's lasting state and its checkpoint; rank 0 writes, every process keeps the same state.

    ``name`` starts log lines ("pretrain"), ``what`` names the run in errors ("pre-training"),
    ``producer`` what writes the checkpoint (for a corrupt one), ``columns`` the history's columns,
    ``log`` the trainer's logger, ``device`` where processes agree on a stop.
    """

    def __init__(self, checkpoint_dir, identity: dict, *, config: dict, name: str, what: str, producer: str,
                 columns, log: logging.Logger, device="cpu"):
        self.checkpoint_path = Path(checkpoint_dir) / "last.pt"
        self.identity, self.config = identity, config
        self.name, self.what, self.producer, self.columns = name, what, producer, tuple(columns)
        self.log, self.device = log, device
        self.is_main = ranks.is_main()
        self.epochs_done, self.history = 0, []
        self.best = {"val_acc": -1.0, "epoch": 0, "state": None}
        self.partial = None  # where a stopped epoch resumes (see resume_point)

    # -- checkpoint
    def resume(self, trainer: Trainer) -> None:
        """Load the checkpoint into ``trainer`` and this run, or start fresh when there is none."""
        state = load_checkpoint(self.checkpoint_path, producer=self.producer)
        if state is None:
            self.log.info("%s: starting from scratch (no %s)", self.name, self.checkpoint_path)
            return
        state = _upgrade(state)
        check_identity(state.get("identity", {}), self.identity, self.checkpoint_path, self.what)
        trainer.load_state(state["trainer"])
        restore_rng(state["rng"])
        self.epochs_done, self.history = int(state["epochs_done"]), list(state["history"])
        self.best, self.partial = dict(state["best"]), state.get("partial")
        step = f", step {self.partial['step']}" if self.partial else ""
        self.log.info("%s: resuming from epoch %d%s (%s)", self.name, self.epochs_done + 1, step,
                      self.checkpoint_path)

    def save(self, trainer: Trainer, partial: dict | None = None) -> None:
        """Replace the checkpoint (rank 0 only): the epochs done, or a stopped epoch's ``partial`` place."""
        if not self.is_main:
            return
        save_checkpoint(self.checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "identity": self.identity, "config": self.config,
            "epochs_done": self.epochs_done, "history": self.history, "best": self.best,
            "trainer": trainer.state(), "rng": capture_rng(), "partial": partial,
        })

    def resume_point(self, epoch: int) -> dict | None:
        """The place a stopped run of ``epoch`` saved (once), or None."""
        place, self.partial = self.partial, None
        return place if place is not None and place["epoch"] == epoch else None

    # -- one epoch
    def end_epoch(self, trainer: Trainer, row: dict) -> None:
        """Keep the best epoch (NaN, not validated, never wins), record the row, checkpoint."""
        if row["val_acc"] > self.best["val_acc"]:
            self.best = {"val_acc": float(row["val_acc"]), "epoch": int(row["epoch"]), "state": trainer.keep()}
        self.history.append(row)
        self.epochs_done = int(row["epoch"])
        self.save(trainer)
        ranks.barrier()  # the other ranks wait for validation and the checkpoint

    def write_history(self, path) -> None:
        if self.is_main:
            write_history(path, self.history, self.columns)

    # -- stopping
    def stop_at(self, trainer: Trainer, epoch: int, place: dict, where: str) -> None:
        """A stop signal came during ``epoch``: checkpoint ``place`` (reached by every process) and end."""
        self.save(trainer, partial={"epoch": epoch, **place})
        ranks.barrier()
        note_stop_elsewhere()  # the process(es) that got no signal stop too
        raise_if_stop_requested(self.what, where, self.checkpoint_path)

    def stop_if_requested(self, where: str) -> None:
        """After a checkpoint of this very point: end the run if any process got SIGTERM/SIGINT."""
        if stop_agreed(self.device):
            note_stop_elsewhere()
        raise_if_stop_requested(self.what, where, self.checkpoint_path)

    def log_epoch(self, row: dict, epochs: int) -> None:
        if not self.is_main:
            return
        numbers = ", ".join(f"{key} {row[key]:.4g}" for key in self.columns if key not in ("epoch", "seconds"))
        best = (f"; best val_acc {self.best['val_acc']:.4f} at epoch {self.best['epoch']}"
                if self.best["state"] is not None else "")
        self.log.info("%s epoch %d/%d: %s%s (%.1f s)", self.name, row["epoch"], epochs, numbers, best,
                      row["seconds"])


def fit(run: TrainingRun, trainer: Trainer, epochs: int, *, desc: str, tensorboard_dir=None,
        history_out=None) -> None:
    """Train epochs ``run.epochs_done + 1`` to ``epochs``, each one checkpointed as it ends.

    ``history_out``: rewritten now and after every epoch (None: the caller writes it).
    ``tensorboard_dir``: where each epoch's scalars go (:mod:`mtl.tracking`; None: nowhere).
    SIGTERM/SIGINT stop the run at the next step with that point saved (:mod:`mtl.stop_signals`).
    """
    if run.epochs_done >= epochs > 0:
        run.log.info("%s: checkpoint %s already holds %d epochs (epochs: %d); writing the outputs from it",
                     run.name, run.checkpoint_path, run.epochs_done, epochs)
    if history_out is not None:
        run.write_history(history_out)
    bar = tqdm(range(run.epochs_done + 1, epochs + 1), desc=desc, unit="epoch", initial=run.epochs_done,
               total=epochs, disable=None if run.is_main else True)
    with stop_on_signals(), open_tracker(tensorboard_dir) as tracker:
        for epoch in bar:
            started = time.perf_counter()
            row = trainer.run_epoch(epoch, resume=run.resume_point(epoch), on_stop=partial(run.stop_at, trainer, epoch))
            row["seconds"] = round(time.perf_counter() - started, 3)
            run.end_epoch(trainer, row)
            run.log_epoch(row, epochs)
            bar.set_postfix(val=f"{row['val_acc']:.4f}", best=f"{run.best['val_acc']:.4f}")
            # rates over the whole epoch, validation included: the pace the job advances at
            tracker.log(epoch, trainer.scalars(row))
            if history_out is not None:
                run.write_history(history_out)
            run.stop_if_requested(f"after epoch {epoch}")


def _upgrade(state: dict) -> dict:
    """A checkpoint in the layout of the module docstring, from any layout this code ever wrote.

    Before format 2, pre-training saved ``model``/``optimizer``/``scaler``, ``best_acc``/
    ``best_epoch``/``best_state`` and ``next_epoch`` (the 1-based epoch to train next, which a
    partial place belongs to); meta-training saved ``trainer``, ``best`` and ``next_epoch`` (the
    0-based index of that epoch, also in its partial place).
    """
    if state.get("format") == CHECKPOINT_FORMAT:
        return state
    if "format" in state:
        raise CheckpointError(f"checkpoint format {state['format']!r} is newer than this code reads; "
                              "update the code or delete the checkpoint folder to start over.")
    state = dict(state)
    place = state.get("partial")
    if "model" in state:  # pre-training
        state["trainer"] = {key: state.pop(key) for key in ("model", "optimizer", "scaler")}
        state["best"] = {"val_acc": state.pop("best_acc"), "epoch": state.pop("best_epoch"),
                         "state": state.pop("best_state")}
        state["epochs_done"] = int(state.pop("next_epoch")) - 1
        if place is not None:
            state["partial"] = {"epoch": state["epochs_done"] + 1, **place}
    else:  # meta-training
        state["epochs_done"] = int(state.pop("next_epoch"))
        if place is not None:
            state["partial"] = {**place, "epoch": int(place["epoch"]) + 1}
    return state
