"""Check a written summary.csv against its summary_per_seed.csv from the formulas alone: used by the
workflow tests on real runs, and checked itself on hand-made runs in tests/test_results.py."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t

from mtl.stats import verdict

#: summary.csv and summary_per_seed.csv hold values rounded to 2 decimals (accuracies, ECE)...
ROUNDING = 0.005
#: ... but NLL to 3 (mtl.results.render.DECIMALS).
CALIBRATION_ROUNDING = {"ece": ROUNDING, "nll": 0.0005}
KEY = ["trained_on", "dataset", "backbone", "method", "shot"]


def t_half_width(values) -> float:
    """``t(0.975, n-1) * sd / sqrt(n)``, sd with ddof=1: the across-seed interval, from its formula."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    sd = math.sqrt(((values - values.mean()) ** 2).sum() / (n - 1))
    return float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def tolerances(n: int, rounding: float = ROUNDING) -> tuple[float, float]:
    """How far a mean and a t-interval over ``n`` values rounded to 2 decimals (``rounding``: half
    the last decimal), themselves rounded alike, may be from the same numbers computed at full
    precision: a mean moves by at most ``rounding``; a sample sd by at most the L2 norm of the
    changes over sqrt(n-1), i.e. rounding * sqrt(n) / sqrt(n-1), so the interval by t(0.975, n-1) *
    rounding / sqrt(n-1); the file's own rounding adds ``rounding`` to each."""
    mean = 2 * rounding + 1e-9
    half = (t.ppf(0.975, n - 1) * rounding / math.sqrt(n - 1) if n > 1 else 0.0) + rounding + 1e-9
    return mean, half


def assert_calibration_matches_per_seed(row: dict, mine: pd.DataFrame) -> None:
    """``ece`` and ``nll`` of a summary row: the mean over the row's seeds of the runs' values and its
    t-interval (none with one seed), and the mean of the uncalibrated values; all empty when a seed
    has none (evaluated before calibration existed)."""
    where = tuple(row[k] for k in KEY)
    n = len(mine)
    for name, rounding in CALIBRATION_ROUNDING.items():
        values, uncalibrated = mine[name], mine[f"{name}_uncalibrated"]
        if values.isna().any():
            assert pd.isna(row[name]) and pd.isna(row[f"{name}_ci95"]), (where, name)
            assert pd.isna(row[f"{name}_uncalibrated"]) == uncalibrated.isna().any(), (where, name)
            continue
        mean_tol, half_tol = tolerances(n, rounding)
        assert row[name] == pytest.approx(values.mean(), abs=mean_tol), (where, name)
        assert row[f"{name}_uncalibrated"] == pytest.approx(uncalibrated.mean(), abs=mean_tol), (where, name)
        if n > 1:
            assert row[f"{name}_ci95"] == pytest.approx(t_half_width(values), abs=half_tol), (where, name)
        else:
            assert pd.isna(row[f"{name}_ci95"]), (where, name)


def assert_summary_matches_per_seed(summary: pd.DataFrame, per_seed: pd.DataFrame, baseline: str = "ft") -> None:
    """Every row of ``summary`` recomputed from ``per_seed`` (both as read from their CSV files): the
    mean over the row's seeds of the run accuracies and its t-interval, the same for the calibration
    errors (:func:`assert_calibration_matches_per_seed`); against ``baseline``, the
    seeds both ran (their count), the mean over them of the per-seed paired differences and its
    t-interval, each seed's difference as the difference of the two runs' accuracies, and, where
    rounding cannot blur them, the seeds above/below and the verdict."""
    runs = per_seed.set_index([*KEY, "seed"]).sort_index()
    diff, half = f"diff_vs_{baseline}", f"diff_vs_{baseline}_ci95"
    for row in summary.to_dict("records"):
        where = tuple(row[k] for k in KEY)
        mine = runs.loc[where]
        n = len(mine)
        assert n == row["n_seeds"] and " ".join(map(str, mine.index)) == str(row["seeds"]), where
        mean_tol, half_tol = tolerances(n)
        assert row["accuracy"] == pytest.approx(mine["accuracy"].mean(), abs=mean_tol), where
        if n > 1:
            assert row["ci95"] == pytest.approx(t_half_width(mine["accuracy"]), abs=half_tol), where
        else:
            assert pd.isna(row["ci95"]), where
        assert_calibration_matches_per_seed(row, mine)
        base_key = (row["trained_on"], row["dataset"], row["backbone"], baseline, row["shot"])
        if row["method"] == baseline or base_key not in runs.droplevel("seed").index:
            assert pd.isna(row[diff]) and pd.isna(row[f"seeds_paired_with_{baseline}"]), where
            continue
        base = runs.loc[base_key]
        paired = mine.index.intersection(base.index)
        d = mine.loc[paired, diff]
        assert row[f"seeds_paired_with_{baseline}"] == len(paired) >= 1, where
        for seed in paired:  # a paired difference over the same episodes is the difference of the means
            assert d[seed] == pytest.approx(mine.loc[seed, "accuracy"] - base.loc[seed, "accuracy"],
                                            abs=3 * ROUNDING + 1e-9), (where, seed)
        mean_tol, half_tol = tolerances(len(paired))
        assert row[diff] == pytest.approx(d.mean(), abs=mean_tol), where
        if len(paired) > 1:
            assert row[half] == pytest.approx(t_half_width(d), abs=half_tol), where
        else:
            assert pd.isna(row[half]), where
        if (d.abs() > ROUNDING).all():  # signs not blurred by rounding
            assert row[f"seeds_above_{baseline}"] == (d > 0).sum(), where
            assert row[f"seeds_below_{baseline}"] == (d < 0).sum(), where
        if len(paired) < 2:
            assert row["verdict"] == "training variance not measured", where
        elif abs(abs(row[diff]) - row[half]) > mean_tol + half_tol:  # clear of the interval's edge
            assert row["verdict"] == verdict(row[diff], row[half], len(paired)), where
