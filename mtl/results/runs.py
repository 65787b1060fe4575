"""Per-run files: write and read one run's ``episodes.csv`` and ``metrics.json``, and load a set of
runs, refusing duplicates and runs scored on different episodes.

Files (one run):
  ``episodes.csv``  columns ``episode`` (index into the shared episode file), ``accuracy`` (fraction 0..1)
  ``metrics.json``  protocol + ``accuracy``/``ci95``/``std`` in % (see :data:`METRICS_KEYS`), and the
                    calibration of its test queries (:data:`CALIBRATION_METRICS`, ``reliability``)

A run written under a method's old name (``lr``, now ``logreg``: :data:`mtl.methods.RENAMED`)
reads under its new name. A run records ``trained_on``, the dataset whose training produced its model, next to ``dataset``,
the test data it was scored on (equal for in-domain runs; a metrics file written before the key
existed reads as in-domain).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mtl.errors import ConfigError, DataError
from mtl.io import atomic_path
from mtl.methods import current_name
from mtl.stats import INTERVAL_FORMULA, as_fractions, summarize_accuracies

log = logging.getLogger(__name__)

#: Keys ``metrics.json`` must hold, in the order they are written. ``seed`` is the training seed of
#: the run; ``episode_seed`` the seed that drew the saved test episodes (shared by every run).
#: ``trained_on`` (written first, see :data:`TRAINED_ON`) is not required: files written before it
#: existed are in-domain runs.
METRICS_KEYS = (
    "dataset", "backbone", "method", "seed", "way", "shot", "query", "episodes", "episode_seed",
    "episodes_file", "episodes_sha256", "accuracy", "ci95", "interval", "std",
)
#: The dataset whose training produced the run's model; ``dataset`` is the test data it was scored on.
TRAINED_ON = "trained_on"
#: What the caller of :func:`write_episode_results` must supply (the rest is computed).
PROTOCOL_KEYS = (
    "dataset", "backbone", "method", "seed", "way", "shot", "query", "episode_seed", "episodes_file",
    "episodes_sha256",
)
#: Fields that must agree between two runs of one dataset/shot before they share a table or a pairing.
COMPARED_FIELDS = ("way", "query", "episodes", "episode_seed", "episodes_sha256")
#: One summary row; a run adds its training seed.
ROW_KEY = (TRAINED_ON, "dataset", "backbone", "method", "shot")
RUN_KEY = ROW_KEY + ("seed",)
#: How well a run's probabilities match its test queries (:func:`mtl.learners.calibration.calibration_report`):
#: the temperature fitted on validation episodes, ECE in points (0-100) and NLL in nats, with it and
#: without it (temperature 1). Not required: a metrics file written before calibration existed lacks
#: them, and its run reads them as NaN (:meth:`Run.calibration`).
CALIBRATION_METRICS = ("temperature", "ece", "nll", "ece_uncalibrated", "nll_uncalibrated")
#: The run's 15-bin table of sums over its test queries (count, confidence, correct per confidence bin).
RELIABILITY = "reliability"


def write_episode_results(path_csv, path_json, accuracies, protocol: Mapping, *, episode_ids=None) -> dict:
    """Write a run's ``episodes.csv`` and ``metrics.json`` atomically; return the metrics dict.

    ``accuracies`` are per-episode fractions in episode-file order (``episode_ids`` defaults to
    0..n-1). ``protocol`` must hold :data:`PROTOCOL_KEYS`; ``episodes`` (the count) is taken from the
    data and, if also given, must match it. ``trained_on`` defaults to ``dataset`` (an in-domain run).
    Extra protocol keys are kept in the JSON after the standard ones.
    """
    array = as_fractions(accuracies, f"write_episode_results ({path_csv})")
    missing = [key for key in PROTOCOL_KEYS if key not in protocol]
    if missing:
        raise ConfigError(
            f"write_episode_results for {path_json}: protocol lacks {missing}; expected keys {list(PROTOCOL_KEYS)}"
        )
    if "episodes" in protocol and int(protocol["episodes"]) != array.size:
        raise ConfigError(
            f"write_episode_results for {path_json}: protocol says {protocol['episodes']} episodes "
            f"but {array.size} accuracies were given"
        )
    ids = np.arange(array.size) if episode_ids is None else np.asarray(episode_ids, dtype=np.int64)
    if ids.shape != array.shape:
        raise ConfigError(f"write_episode_results: {ids.size} episode ids for {array.size} accuracies")

    stats = summarize_accuracies(array)
    metrics = {key: protocol[key] for key in PROTOCOL_KEYS}
    metrics.update(
        episodes=stats["n"], accuracy=stats["accuracy"], ci95=stats["ci95"],
        interval=INTERVAL_FORMULA, std=stats["std"],
    )
    metrics = {TRAINED_ON: _plain(protocol.get(TRAINED_ON, protocol["dataset"])),
               **{key: _plain(metrics[key]) for key in METRICS_KEYS}}
    metrics.update({key: _plain(value) for key, value in protocol.items() if key not in metrics})

    with atomic_path(path_csv) as tmp:
        pd.DataFrame({"episode": ids, "accuracy": array}).to_csv(tmp, index=False)
    with atomic_path(path_json) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("%s: %.2f +- %.2f %% over %d episodes", path_json, stats["accuracy"], stats["ci95"], stats["n"])
    return metrics


def _plain(value):
    """numpy scalars and paths as JSON-friendly Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def read_metrics(path) -> dict:
    """Load a ``metrics.json``, checking it holds every key of :data:`METRICS_KEYS`.

    A file without ``trained_on`` (written before transfer evaluation existed) is an in-domain run:
    it reads as ``trained_on = dataset``, so older results need no re-evaluation.
    """
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"metrics file {path} does not exist; run the evaluate step for it") from None
    except json.JSONDecodeError as error:
        raise DataError(f"metrics file {path} is not valid JSON ({error}); rerun the evaluate step") from None
    missing = [key for key in METRICS_KEYS if key not in metrics] if isinstance(metrics, dict) else list(METRICS_KEYS)
    if missing:
        raise DataError(f"metrics file {path} lacks {missing}; it was written by another version, rerun evaluate")
    metrics.setdefault(TRAINED_ON, metrics["dataset"])
    metrics["method"] = current_name(metrics["method"])  # a renamed method's old results
    return metrics


def read_csv_table(path, what: str, fix: str) -> pd.DataFrame:
    """``pd.read_csv(path)``, or a DataError naming ``what`` the file is and the ``fix``."""
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist; {fix}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{what} {path} is not a readable CSV ({error}); {fix}") from None


def read_episode_accuracies(path) -> pd.Series:
    """Per-episode accuracies (fractions) of ``episodes.csv``, indexed by episode id."""
    path = Path(path)
    table = read_csv_table(path, "episodes file", "rerun the evaluate step for it")
    if not {"episode", "accuracy"} <= set(table.columns):
        raise DataError(f"episodes file {path}: expected columns episode, accuracy; found {list(table.columns)}")
    if table["episode"].duplicated().any():
        raise DataError(f"episodes file {path}: episode ids repeat; rerun evaluate")
    as_fractions(table["accuracy"].to_numpy(), f"episodes file {path}")
    return pd.Series(table["accuracy"].to_numpy(dtype=np.float64), index=table["episode"].astype(np.int64))


# ----------------------------------------------------------------------------- loading runs
class Run:
    """One evaluated run: its metrics, its per-episode accuracies and where they came from."""

    def __init__(self, metrics_path, episodes_path):
        self.metrics_path = Path(metrics_path)
        self.episodes_path = Path(episodes_path)
        self.metrics = read_metrics(self.metrics_path)
        self.episodes = read_episode_accuracies(self.episodes_path)
        self._check_files_agree()

    @property
    def key(self) -> tuple:
        return tuple(self.metrics[field] for field in RUN_KEY)

    @property
    def row_key(self) -> tuple:
        return tuple(self.metrics[field] for field in ROW_KEY)

    @property
    def seed(self) -> int:
        return int(self.metrics["seed"])

    @property
    def is_transfer(self) -> bool:
        return is_transfer(self.metrics)

    @property
    def calibration(self) -> dict[str, float]:
        """:data:`CALIBRATION_METRICS` of the run, NaN where its metrics file predates calibration."""
        return {key: float(self.metrics.get(key, math.nan)) for key in CALIBRATION_METRICS}

    @property
    def reliability(self) -> dict | None:
        """The run's reliability table (sums per confidence bin), None where its metrics file has none."""
        return self.metrics.get(RELIABILITY)

    def _check_files_agree(self) -> None:
        """metrics.json and episodes.csv must come from the same evaluation (not a stale mix)."""
        count, mean = len(self.episodes), float(self.episodes.mean() * 100.0)
        if count != int(self.metrics["episodes"]) or abs(mean - float(self.metrics["accuracy"])) > 0.01:
            raise DataError(
                f"{self.metrics_path} says {self.metrics['episodes']} episodes at {self.metrics['accuracy']:.2f}% "
                f"but {self.episodes_path} holds {count} episodes at {mean:.2f}%; they come from different "
                "evaluations: rerun the evaluate step for this run"
            )


def is_transfer(row: Mapping) -> bool:
    """Whether a run or row was trained on another dataset than the one it was tested on."""
    return row[TRAINED_ON] != row["dataset"]


def check_same_protocol(first: Run, second: Run) -> None:
    """Refuse two runs that were not scored on the same episodes: they cannot share a table or a pairing."""
    differing = [f for f in COMPARED_FIELDS if first.metrics[f] != second.metrics[f]]
    if differing:
        detail = "; ".join(f"{f}: {first.metrics[f]!r} vs {second.metrics[f]!r}" for f in differing)
        raise ConfigError(
            f"runs of {first.metrics['dataset']} {first.metrics['shot']}-shot were scored under different "
            f"protocols and cannot share a table or be paired: {first.metrics_path} and {second.metrics_path} "
            f"differ in {detail}. Re-evaluate them on the same episode file"
        )
    if not first.episodes.index.equals(second.episodes.index):
        raise ConfigError(
            f"{first.episodes_path} and {second.episodes_path} list different episode ids although their "
            "protocols match; re-evaluate them on the same episode file"
        )


def load_runs(pairs: Iterable[Sequence]) -> list[Run]:
    """Read ``(metrics_json, episodes_csv)`` pairs; refuse duplicates and mixed protocols per dataset/shot."""
    runs = [Run(*pair) for pair in pairs]
    if not runs:
        raise ConfigError("no runs given; evaluate at least one dataset/method/shot/seed first")
    seen: dict[tuple, Run] = {}
    first_of_group: dict[tuple, Run] = {}
    for run in runs:
        if run.key in seen:
            raise ConfigError(
                f"two runs for {dict(zip(RUN_KEY, run.key))}: {seen[run.key].metrics_path} and "
                f"{run.metrics_path}; pass each run once"
            )
        seen[run.key] = run
        group = (run.metrics["dataset"], run.metrics["shot"])
        if group in first_of_group:
            check_same_protocol(first_of_group[group], run)
        else:
            first_of_group[group] = run
    return runs

