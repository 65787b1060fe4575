"""The tables: one row per run (``per_seed_table``) and one row per trained-on x dataset x backbone x
method x shot across its training seeds (``build_summary``), with the paired differences to a
baseline and the calibration of the probabilities; full precision (the written files round,
:mod:`mtl.results.render`). ``pooled_reliability`` adds up the runs' reliability tables per row.

The aggregation is described in :mod:`mtl.results`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mtl.methods import NAMES
from mtl.published import reference_for
from mtl.errors import DataError
from mtl.results.runs import CALIBRATION_METRICS, ROW_KEY, TRAINED_ON, Run, check_same_protocol, is_transfer
from mtl.stats import (
    NOT_MEASURED, SEED_INTERVAL, ci95, expected_calibration_error, paired_difference, pool_reliability, t_interval,
    verdict,
)

METHOD_ORDER = NAMES  # the method registry's order
BASELINE = "ft"
#: The calibration columns of ``summary.csv``: ECE (points) and NLL (nats) of the calibrated
#: probabilities, each the mean over seeds with its t-interval over seeds, then the mean over seeds
#: of the learner's own probabilities (temperature 1), to show what calibration did.
SUMMARY_CALIBRATION = ("ece", "ece_ci95", "ece_uncalibrated", "nll", "nll_ci95", "nll_uncalibrated")

log = logging.getLogger(__name__)


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _sorted(table: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """In-domain rows first, in their usual order (dataset, backbone, shot, method), then the
    transfer rows by trained_on and target."""
    table = table.assign(_rank=[_method_rank(m)[0] for m in table["method"]],
                         _transfer=table[TRAINED_ON] != table["dataset"])
    table = table.sort_values(["_transfer", TRAINED_ON, "dataset", "backbone", "shot", "_rank", "method", *extra],
                              kind="stable")
    return table.drop(columns=["_rank", "_transfer"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- per-seed table
_PER_SEED_PROTOCOL = (
    TRAINED_ON, "dataset", "backbone", "method", "seed", "way", "shot", "query", "episodes", "episode_seed",
)


def per_seed_columns(baseline: str = BASELINE) -> list[str]:
    return [
        *_PER_SEED_PROTOCOL,
        "accuracy", "ci95", "interval", f"diff_vs_{baseline}", f"diff_vs_{baseline}_ci95", *CALIBRATION_METRICS,
    ]


def per_seed_table(runs: Sequence[Run], *, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per run (training seed included), intervals over test episodes only.

    ``diff_vs_<baseline>`` pairs the run with the baseline run of the same seed on the same episodes
    (and, for a transfer run, trained on the same dataset). The calibration columns are the run's own
    (:data:`mtl.results.runs.CALIBRATION_METRICS`; NaN for a run evaluated before calibration existed).
    """
    by_key = {run.key: run for run in runs}
    rows = []
    for run in runs:
        m = run.metrics
        row = {field: m[field] for field in _PER_SEED_PROTOCOL}
        row.update(accuracy=float(m["accuracy"]), ci95=float(m["ci95"]), interval=m["interval"])
        diff = ci = math.nan
        base = by_key.get((m[TRAINED_ON], m["dataset"], m["backbone"], baseline, m["shot"], m["seed"]))
        if base is not None and base is not run:
            diff, ci = paired_difference(run.episodes.to_numpy(), base.episodes.loc[run.episodes.index].to_numpy())
        row[f"diff_vs_{baseline}"], row[f"diff_vs_{baseline}_ci95"] = diff, ci
        row.update(run.calibration)
        rows.append(row)
    return _sorted(pd.DataFrame(rows, columns=per_seed_columns(baseline)), extra=["seed"])


# ----------------------------------------------------------------------------- across-seed table
def summary_columns(baseline: str = BASELINE) -> list[str]:
    """Column order of ``summary.csv`` (``*_vs_<baseline>`` names follow the baseline)."""
    return [
        TRAINED_ON, "dataset", "backbone", "method", "way", "shot", "query", "episodes", "episode_seed",
        "n_seeds", "seeds", "accuracy", "seed_std", "ci95", "interval", "episode_ci95",
        f"diff_vs_{baseline}", f"diff_vs_{baseline}_ci95", f"diff_vs_{baseline}_episode_ci95",
        f"seeds_paired_with_{baseline}", f"seeds_above_{baseline}", f"seeds_below_{baseline}", "verdict",
        "reference_accuracy", "reference_ci95", "reference_source", *SUMMARY_CALIBRATION,
    ]


def build_summary(runs: Sequence[Run], *, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per trained_on x dataset x backbone x method x shot, aggregated over its training seeds.

    ``accuracy`` is the mean over seeds and ``ci95`` its t-interval over seeds (NaN with one seed,
    ``interval`` then says the training variance is not measured). ``episode_ci95`` is the
    test-episode interval of the seed-averaged per-episode accuracies, for comparison with the
    reference code's intervals. ``diff_vs_<baseline>`` is the mean over the seeds both share of the
    per-seed paired differences, with its t-interval, its episode interval, the number of seeds
    shared (``seeds_paired_with_<baseline>``: the ``n`` of that t-interval, at most ``n_seeds``) and
    the number of them above/below the baseline. ``ece`` and ``nll`` are the means over seeds of the
    runs' calibration errors with their t-intervals over seeds, like ``accuracy`` (NaN where a seed was
    evaluated before calibration existed). Values are full precision; :func:`write_summary` rounds.
    """
    groups: dict[tuple, dict[int, Run]] = {}
    for run in runs:
        groups.setdefault(run.row_key, {})[run.seed] = run
    rows = [_summary_row(key, seeds, groups, baseline) for key, seeds in groups.items()]
    return _sorted(pd.DataFrame(rows, columns=summary_columns(baseline)))


def _seed_matrix(runs_by_seed: Mapping[int, Run], seeds: Sequence[int]) -> np.ndarray:
    """(n_seeds, n_episodes) per-episode accuracies in %, episodes in one shared order."""
    index = runs_by_seed[seeds[0]].episodes.index
    return np.stack([runs_by_seed[s].episodes.loc[index].to_numpy() for s in seeds]) * 100.0


def _summary_row(key: tuple, runs_by_seed: Mapping[int, Run], groups: Mapping, baseline: str) -> dict:
    seeds = sorted(runs_by_seed)
    first = runs_by_seed[seeds[0]].metrics
    row = dict(zip(ROW_KEY, key))
    row.update({field: first[field] for field in ("way", "query", "episodes", "episode_seed")})
    accuracy, half, sd = t_interval([runs_by_seed[s].metrics["accuracy"] for s in seeds])
    row.update(
        n_seeds=len(seeds), seeds=" ".join(str(s) for s in seeds), accuracy=accuracy, seed_std=sd,
        ci95=half, interval=SEED_INTERVAL if len(seeds) > 1 else NOT_MEASURED,
        episode_ci95=ci95(_seed_matrix(runs_by_seed, seeds).mean(axis=0)),
    )
    row.update(_paired_over_seeds(key, runs_by_seed, groups, baseline))
    # published figures are in-domain figures: none for a model trained on another dataset
    reference = None if is_transfer(row) else reference_for(row["method"], row["dataset"], row["shot"], row["way"])
    row["reference_accuracy"], row["reference_ci95"], row["reference_source"] = (
        reference if reference is not None else (math.nan, math.nan, "")
    )
    row.update(_calibration_over_seeds([runs_by_seed[s] for s in seeds]))
    return row


def _calibration_over_seeds(runs: Sequence[Run]) -> dict:
    """The :data:`SUMMARY_CALIBRATION` cells: per seed, the run's ECE and NLL; then, as for accuracy,
    their mean and t-interval over seeds (no interval with one seed). NaN when a seed lacks them: a
    mean over fewer seeds than the row's ``n_seeds`` would read as one over all of them."""
    row = {}
    for name in ("ece", "nll"):
        calibrated = np.array([run.calibration[name] for run in runs])
        uncalibrated = np.array([run.calibration[f"{name}_uncalibrated"] for run in runs])
        mean, half, _ = t_interval(calibrated) if np.isfinite(calibrated).all() else (math.nan, math.nan, math.nan)
        row.update({name: mean, f"{name}_ci95": half, f"{name}_uncalibrated": float(uncalibrated.mean())})
    return row


def _paired_over_seeds(key: tuple, runs_by_seed: Mapping[int, Run], groups: Mapping, baseline: str) -> dict:
    """The ``*_vs_<baseline>`` cells: per-seed paired differences, then a t-interval over seeds."""
    trained_on, dataset, backbone, method, shot = key
    names = [f"diff_vs_{baseline}", f"diff_vs_{baseline}_ci95", f"diff_vs_{baseline}_episode_ci95",
             f"seeds_paired_with_{baseline}", f"seeds_above_{baseline}", f"seeds_below_{baseline}", "verdict"]
    # the baseline trained on the same dataset (same encoders), scored on the same episodes
    base_by_seed = groups.get((trained_on, dataset, backbone, baseline, shot), {})
    seeds = sorted(set(runs_by_seed) & set(base_by_seed))
    if method == baseline or not seeds:
        return dict(zip(names, [math.nan] * (len(names) - 1) + [""]))
    for seed in seeds:
        check_same_protocol(base_by_seed[seed], runs_by_seed[seed])
    per_episode = _seed_matrix(runs_by_seed, seeds) - _seed_matrix(base_by_seed, seeds)  # (seeds, episodes)
    per_seed = per_episode.mean(axis=1)
    diff, half, _ = t_interval(per_seed)
    return dict(zip(names, [
        diff, half, ci95(per_episode.mean(axis=0)), len(seeds), int((per_seed > 0).sum()),
        int((per_seed < 0).sum()), verdict(diff, half, len(seeds)),
    ]))




# ----------------------------------------------------------------------------- reliability
def pooled_reliability(runs: Sequence[Run]) -> dict[tuple, dict]:
    """Per summary row (:data:`ROW_KEY`), the reliability table of the test queries of all its seeds
    together (the runs' tables are sums per confidence bin, so they pool by adding), with ``ece``,
    the expected calibration error of the pooled queries in points, and ``seeds``, how many runs
    were pooled. A row with a seed evaluated before calibration existed has no table: pooling the
    other seeds alone would pass for the row.
    """
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.row_key, []).append(run)
    pooled = {}
    for key, group in groups.items():
        missing = [str(run.metrics_path) for run in group if run.reliability is None]
        if missing:
            log.warning("no reliability table in %s (evaluated before calibration existed): %s is left out of "
                        "the reliability plot; rerun evaluate for it", ", ".join(missing), dict(zip(ROW_KEY, key)))
            continue
        try:
            table = pool_reliability(run.reliability for run in group)
        except ValueError as error:
            raise DataError(f"the reliability tables of {[str(run.metrics_path) for run in group]} cannot be pooled "
                            f"({error}); rerun evaluate for them") from None
        pooled[key] = {**table, "ece": expected_calibration_error(table), "seeds": len(group)}
    return pooled
