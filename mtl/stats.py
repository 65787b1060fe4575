"""The statistics behind every accuracy we print: intervals over test episodes, the Student-t
interval over training seeds, paired differences and the verdict they give; and the arithmetic of
the calibration tables (expected calibration error, pooling runs).

NumPy only, so that training (which reports validation accuracy with :func:`mean_ci95`) does not
load pandas or scipy for it; scipy's Student-t quantile is imported by :func:`t_interval` alone.
How :mod:`mtl.results` aggregates runs with these functions is described there.
"""
from __future__ import annotations

import math

import numpy as np

from mtl.errors import MTLError

#: The per-run interval (over test episodes).
INTERVAL_FORMULA = "1.96*std/sqrt(n)"
#: The across-seed interval of the summary table, and what a one-seed row says instead.
SEED_INTERVAL = "t(0.975,n_seeds-1)*sd/sqrt(n_seeds) over training seeds"
NOT_MEASURED = "training variance not measured (1 seed)"
Z_95 = 1.96


def as_vector(values, what: str) -> np.ndarray:
    """A non-empty, finite, 1-D float array, or an MTLError saying what was passed instead."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise MTLError(f"{what}: expected a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise MTLError(f"{what}: found {int(np.sum(~np.isfinite(array)))} NaN/inf value(s)")
    return array


def as_fractions(accuracies, what: str) -> np.ndarray:
    """Per-episode accuracies as fractions 0..1; refuses percentages so a x100 slip cannot pass."""
    array = as_vector(accuracies, what)
    if array.min() < 0.0 or array.max() > 1.0:
        raise MTLError(
            f"{what}: per-episode accuracies must be fractions in 0..1, "
            f"saw values in [{array.min():g}, {array.max():g}] (percentages? divide by 100)"
        )
    return array


def ci95(values) -> float:
    """Half-width of the 95% interval of the mean: ``1.96 * std(values, ddof=0) / sqrt(n)``.

    This is the MTL reference code's formula (normal approximation, *population* std), kept so our
    intervals read like the ones users compare against. Same unit as ``values``.
    """
    array = as_vector(values, "ci95")
    return float(Z_95 * array.std(ddof=0) / math.sqrt(array.size))


def mean_ci95(accuracies) -> tuple[float, float]:
    """Mean and :func:`ci95` of per-episode accuracies, in their own unit (validation uses fractions)."""
    array = as_vector(accuracies, "mean_ci95")
    return float(array.mean()), ci95(array)


def summarize_accuracies(accuracies) -> dict:
    """Mean accuracy, its 95% interval and the population std, all in %, from per-episode fractions."""
    array = as_fractions(accuracies, "summarize_accuracies")
    percent = array * 100.0
    return {
        "accuracy": float(percent.mean()),
        "ci95": ci95(percent),
        "std": float(percent.std(ddof=0)),
        "n": int(array.size),
    }


def paired_difference(acc_a, acc_b) -> tuple[float, float]:
    """Mean of ``a - b`` over the same episodes, in percentage points, and the 95% interval of it.

    Both inputs are per-episode fractions, episode i of ``a`` being episode i of ``b``: only valid when
    both runs were scored on the same episode file (the caller checks ``episodes_sha256``; here only the
    lengths can be checked). Pairing removes the episode-difficulty variance both methods share.
    """
    a = as_fractions(acc_a, "paired_difference (first run)")
    b = as_fractions(acc_b, "paired_difference (second run)")
    if a.size != b.size:
        raise MTLError(
            f"paired_difference needs the same episodes for both runs: got {a.size} and {b.size} "
            "per-episode accuracies; score both methods on the same episode file"
        )
    diff = (a - b) * 100.0
    return float(diff.mean()), ci95(diff)


def t_interval(values) -> tuple[float, float, float]:
    """Mean, half-width of the 95% Student-t interval and sample std (``ddof=1``) of ``values``.

    ``t(0.975, n-1) * sd / sqrt(n)``: the interval for the mean of ``n`` independent replicates
    (training seeds). Half-width and std are NaN for a single value: one replicate says nothing
    about the variance between replicates.
    """
    array = as_vector(values, "t_interval")
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan, math.nan
    # imported here, not above: scipy.stats takes seconds to import, and training imports this module
    from scipy import stats

    sd = float(array.std(ddof=1))
    return mean, float(stats.t.ppf(0.975, array.size - 1) * sd / math.sqrt(array.size)), sd


def verdict(diff: float, half_width: float, n_seeds: int) -> str:
    """'better', 'worse' or 'no detectable difference' from a t-interval over seeds; one seed gives none."""
    if n_seeds < 2 or math.isnan(half_width):
        return "training variance not measured"
    if diff - half_width > 0:
        return "better"
    if diff + half_width < 0:
        return "worse"
    return "no detectable difference"


# ----------------------------------------------------------------------------- calibration tables
def expected_calibration_error(table: dict) -> float:
    """ECE in points (0-100) of a reliability table (:func:`mtl.learners.calibration.reliability`:
    per confidence bin, the ``count`` of queries, the sum of their ``confidence`` and how many are
    ``correct``), one run's or several pooled: ``sum_b |correct_b - confidence_b| / sum_b count_b``,
    i.e. the mean over queries of |accuracy - mean confidence| of their bin."""
    count = np.asarray(table["count"], dtype=np.float64)
    gap = np.abs(np.asarray(table["correct"]) - np.asarray(table["confidence"]))  # n_b * |acc_b - conf_b|
    return float(100.0 * gap.sum() / count.sum())


def pool_reliability(tables) -> dict:
    """The reliability table of several runs' queries together: the tables are sums, so they add."""
    tables = list(tables)
    if not tables or len({t["bins"] for t in tables}) != 1:
        raise ValueError("pool_reliability needs at least one table, all with the same number of bins")
    return {"bins": tables[0]["bins"],
            **{key: np.sum([t[key] for t in tables], axis=0).tolist() for key in ("count", "confidence", "correct")}}
