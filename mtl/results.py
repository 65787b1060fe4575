"""The numbers users read: per-run accuracy, the across-seed summary with its intervals, paired
differences and the verdict sentences.

Pure functions over pandas/numpy/scipy (no torch, no Snakemake), in the spirit of imagenet's ``accuracy()``.

Aggregation, in this order:
1. **per episode -> per run.** A run is one dataset x backbone x method x shot x *training seed*.
   Its accuracy is the mean over the saved test episodes with the reference code's interval
   ``1.96 * std / sqrt(n)`` (population std, ``n`` episodes). That interval covers the sampling of
   test episodes only, not the variance between training runs.
2. **per run -> across seeds.** Each training seed replicates the whole training chain. The summary
   row is the mean of the per-seed accuracies with a Student-t interval over seeds,
   ``t(0.975, n_seeds-1) * sd / sqrt(n_seeds)`` (``sd`` with ``ddof=1``). With one seed the training
   variance is unmeasured and the row says so instead of printing an interval.
3. **paired differences.** Every method and seed of a dataset/shot is scored on the *same* saved
   episodes (same ``episodes_sha256``). Per seed, ``d_s`` is the mean over episodes of method minus
   baseline (the baseline run of the *same* seed, i.e. the same pre-trained encoder); the difference
   reported is the mean of ``d_s`` with a t-interval over seeds, plus how many seeds favour each side.
   Only the seeds both the method and the baseline have are paired: their count
   (``seeds_paired_with_<baseline>``) is the ``n`` of that interval, of the verdict sentence and of
   "k of n seeds favour", and can be smaller than the method's own ``n_seeds``.

**Transfer.** A run records ``trained_on``, the dataset whose training produced its model, next to
``dataset``, the test data it was scored on (equal for in-domain runs; a metrics file written before
the key existed reads as in-domain). Rows and pairings are keyed by both: a transfer run of method m
(trained on S, tested on T) is paired with the ``ft`` run of the same S and seed on the same saved
episodes of T. Published figures are only shown for in-domain rows.

Files (one run):
  ``episodes.csv``  columns ``episode`` (index into the shared episode file), ``accuracy`` (fraction 0..1)
  ``metrics.json``  protocol + ``accuracy``/``ci95``/``std`` in % (see :data:`METRICS_KEYS`)
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
from scipy import stats

from mtl.errors import ConfigError, DataError, MTLError
from mtl.io import atomic_path
from mtl.methods import NAMES

log = logging.getLogger(__name__)

#: The per-run interval (over test episodes).
INTERVAL_FORMULA = "1.96*std/sqrt(n)"
#: The across-seed interval of the summary table, and what a one-seed row says instead.
SEED_INTERVAL = "t(0.975,n_seeds-1)*sd/sqrt(n_seeds) over training seeds"
NOT_MEASURED = "training variance not measured (1 seed)"
Z_95 = 1.96
METHOD_ORDER = NAMES  # the method registry's order
BASELINE = "ft"

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

_TF_PROTOCOL_NOTE = "its TF meta-test used queries per class = shot, so its interval is not comparable with ours"
#: Published 5-way accuracies (docs/reference-implementation.md, section 3), % mean and 95% interval, per method.
#: Only figures we could verify are here (the MTL+HT FC100 figures are not).
REFERENCE_ACCURACIES: dict[str, dict] = {
    "mtl": {
        "source": f"MTL paper (no HT), ResNet-12; {_TF_PROTOCOL_NOTE}",
        "values": {
            ("miniimagenet", 1): (60.2, 1.8),
            ("miniimagenet", 5): (74.3, 0.9),
            ("fc100", 1): (43.6, 1.8),
            ("fc100", 5): (55.4, 0.9),
        },
    },
    "mtl_ht": {
        "source": f"MTL+HT paper, ResNet-12; {_TF_PROTOCOL_NOTE}",
        "values": {
            ("miniimagenet", 1): (61.2, 1.8),
            ("miniimagenet", 5): (75.5, 0.8),
            ("tieredimagenet", 1): (65.6, 1.8),
            ("tieredimagenet", 5): (80.6, 0.9),
        },
    },
}
REFERENCE_WAY = 5


# ----------------------------------------------------------------------------- statistics
def _as_vector(values, what: str) -> np.ndarray:
    """A non-empty, finite, 1-D float array, or an MTLError saying what was passed instead."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise MTLError(f"{what}: expected a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise MTLError(f"{what}: found {int(np.sum(~np.isfinite(array)))} NaN/inf value(s)")
    return array


def _as_fractions(accuracies, what: str) -> np.ndarray:
    """Per-episode accuracies as fractions 0..1; refuses percentages so a x100 slip cannot pass."""
    array = _as_vector(accuracies, what)
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
    array = _as_vector(values, "ci95")
    return float(Z_95 * array.std(ddof=0) / math.sqrt(array.size))


def mean_ci95(accuracies) -> tuple[float, float]:
    """Mean and :func:`ci95` of per-episode accuracies, in their own unit (validation uses fractions)."""
    array = _as_vector(accuracies, "mean_ci95")
    return float(array.mean()), ci95(array)


def summarize_accuracies(accuracies) -> dict:
    """Mean accuracy, its 95% interval and the population std, all in %, from per-episode fractions."""
    array = _as_fractions(accuracies, "summarize_accuracies")
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
    a = _as_fractions(acc_a, "paired_difference (first run)")
    b = _as_fractions(acc_b, "paired_difference (second run)")
    if a.size != b.size:
        raise MTLError(
            f"paired_difference needs the same episodes for both runs: got {a.size} and {b.size} "
            "per-episode accuracies; score both methods on the same episode file"
        )
    diff = (a - b) * 100.0
    return float(diff.mean()), ci95(diff)


# ----------------------------------------------------------------------------- per-run files
def write_episode_results(path_csv, path_json, accuracies, protocol: Mapping, *, episode_ids=None) -> dict:
    """Write a run's ``episodes.csv`` and ``metrics.json`` atomically; return the metrics dict.

    ``accuracies`` are per-episode fractions in episode-file order (``episode_ids`` defaults to
    0..n-1). ``protocol`` must hold :data:`PROTOCOL_KEYS`; ``episodes`` (the count) is taken from the
    data and, if also given, must match it. ``trained_on`` defaults to ``dataset`` (an in-domain run).
    Extra protocol keys are kept in the JSON after the standard ones.
    """
    array = _as_fractions(accuracies, f"write_episode_results ({path_csv})")
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
    _as_fractions(table["accuracy"].to_numpy(), f"episodes file {path}")
    return pd.Series(table["accuracy"].to_numpy(dtype=np.float64), index=table["episode"].astype(np.int64))


# ----------------------------------------------------------------------------- across seeds
def t_interval(values) -> tuple[float, float, float]:
    """Mean, half-width of the 95% Student-t interval and sample std (``ddof=1``) of ``values``.

    ``t(0.975, n-1) * sd / sqrt(n)``: the interval for the mean of ``n`` independent replicates
    (training seeds). Half-width and std are NaN for a single value: one replicate says nothing
    about the variance between replicates.
    """
    array = _as_vector(values, "t_interval")
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan, math.nan
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


# ----------------------------------------------------------------------------- loading runs
class _Run:
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


def _check_same_protocol(first: _Run, second: _Run) -> None:
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


def load_runs(pairs: Iterable[Sequence]) -> list[_Run]:
    """Read ``(metrics_json, episodes_csv)`` pairs; refuse duplicates and mixed protocols per dataset/shot."""
    runs = [_Run(*pair) for pair in pairs]
    if not runs:
        raise ConfigError("no runs given; evaluate at least one dataset/method/shot/seed first")
    seen: dict[tuple, _Run] = {}
    first_of_group: dict[tuple, _Run] = {}
    for run in runs:
        if run.key in seen:
            raise ConfigError(
                f"two runs for {dict(zip(RUN_KEY, run.key))}: {seen[run.key].metrics_path} and "
                f"{run.metrics_path}; pass each run once"
            )
        seen[run.key] = run
        group = (run.metrics["dataset"], run.metrics["shot"])
        if group in first_of_group:
            _check_same_protocol(first_of_group[group], run)
        else:
            first_of_group[group] = run
    return runs


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


def reference_for(method: str, dataset: str, shot: int, way: int) -> tuple[float, float, str] | None:
    """Published (accuracy %, ci95 %, source) for this row, or None (only for 5-way rows)."""
    entry = REFERENCE_ACCURACIES.get(method)
    if entry is None or int(way) != REFERENCE_WAY:
        return None
    values = entry["values"].get((str(dataset).lower(), int(shot)))
    return None if values is None else (values[0], values[1], entry["source"])


# ----------------------------------------------------------------------------- per-seed table
_PER_SEED_PROTOCOL = (
    TRAINED_ON, "dataset", "backbone", "method", "seed", "way", "shot", "query", "episodes", "episode_seed",
)


def per_seed_columns(baseline: str = BASELINE) -> list[str]:
    return [
        *_PER_SEED_PROTOCOL,
        "accuracy", "ci95", "interval", f"diff_vs_{baseline}", f"diff_vs_{baseline}_ci95",
    ]


def per_seed_table(runs: Sequence[_Run], *, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per run (training seed included), intervals over test episodes only.

    ``diff_vs_<baseline>`` pairs the run with the baseline run of the same seed on the same episodes
    (and, for a transfer run, trained on the same dataset).
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
        "reference_accuracy", "reference_ci95", "reference_source",
    ]


def build_summary(runs: Sequence[_Run], *, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per trained_on x dataset x backbone x method x shot, aggregated over its training seeds.

    ``accuracy`` is the mean over seeds and ``ci95`` its t-interval over seeds (NaN with one seed,
    ``interval`` then says the training variance is not measured). ``episode_ci95`` is the
    test-episode interval of the seed-averaged per-episode accuracies, for comparison with the
    reference code's intervals. ``diff_vs_<baseline>`` is the mean over the seeds both share of the
    per-seed paired differences, with its t-interval, its episode interval, the number of seeds
    shared (``seeds_paired_with_<baseline>``: the ``n`` of that t-interval, at most ``n_seeds``) and
    the number of them above/below the baseline. Values are full precision; :func:`write_summary` rounds.
    """
    groups: dict[tuple, dict[int, _Run]] = {}
    for run in runs:
        groups.setdefault(run.row_key, {})[run.seed] = run
    rows = [_summary_row(key, seeds, groups, baseline) for key, seeds in groups.items()]
    return _sorted(pd.DataFrame(rows, columns=summary_columns(baseline)))


def _seed_matrix(runs_by_seed: Mapping[int, _Run], seeds: Sequence[int]) -> np.ndarray:
    """(n_seeds, n_episodes) per-episode accuracies in %, episodes in one shared order."""
    index = runs_by_seed[seeds[0]].episodes.index
    return np.stack([runs_by_seed[s].episodes.loc[index].to_numpy() for s in seeds]) * 100.0


def _summary_row(key: tuple, runs_by_seed: Mapping[int, _Run], groups: Mapping, baseline: str) -> dict:
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
    return row


def _paired_over_seeds(key: tuple, runs_by_seed: Mapping[int, _Run], groups: Mapping, baseline: str) -> dict:
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
        _check_same_protocol(base_by_seed[seed], runs_by_seed[seed])
    per_episode = _seed_matrix(runs_by_seed, seeds) - _seed_matrix(base_by_seed, seeds)  # (seeds, episodes)
    per_seed = per_episode.mean(axis=1)
    diff, half, _ = t_interval(per_seed)
    return dict(zip(names, [
        diff, half, ci95(per_episode.mean(axis=0)), len(seeds), int((per_seed > 0).sum()),
        int((per_seed < 0).sum()), verdict(diff, half, len(seeds)),
    ]))


# ----------------------------------------------------------------------------- verdict sentences
def verdict_sentences(summary: pd.DataFrame, baseline: str = BASELINE) -> list[str]:
    """One sentence per method compared with the baseline, worded from the numbers alone."""
    sentences = []
    for row in summary.itertuples(index=False):
        row = row._asdict()
        if row["method"] == baseline or pd.isna(row[f"diff_vs_{baseline}"]):
            continue
        sentences.append(_sentence(row, baseline))
    return sentences


def _sentence(row: Mapping, baseline: str) -> str:
    method, diff = row["method"], row[f"diff_vs_{baseline}"]
    where = (f"trained on {row[TRAINED_ON]}, tested on {row['dataset']}" if is_transfer(row)
             else f"{row['dataset']}")
    subject = f"{method} vs {baseline}, {where} {row['way']}-way {row['shot']}-shot"
    n = int(row[f"seeds_paired_with_{baseline}"])  # the difference's seeds, not the method's own n_seeds
    if row["verdict"] == "training variance not measured":
        return (f"{subject}: {diff:+.2f} points on 1 seed (± {row[f'diff_vs_{baseline}_episode_ci95']:.2f} from "
                "test-episode sampling alone): training variance not measured, so no verdict; "
                "run more training seeds (protocol.seeds).")
    above = int(row[f"seeds_above_{baseline}"])
    conclusion = {
        "better": f"{method} is better",
        "worse": f"{method} is worse",
        "no detectable difference": "no detectable difference",
    }[row["verdict"]]
    return (f"{subject}: {diff:+.2f} ± {row[f'diff_vs_{baseline}_ci95']:.2f} points over {n} seeds "
            f"({above} of {n} favour {method}): {conclusion}.")


# ----------------------------------------------------------------------------- summary files
def _baseline_of(df: pd.DataFrame) -> str:
    names = [c[len("diff_vs_"):] for c in df.columns
             if c.startswith("diff_vs_") and not c.endswith("_ci95")]
    if len(names) != 1:
        raise ConfigError(f"summary table: expected one diff_vs_<baseline> column, found columns {list(df.columns)}")
    return names[0]


def _round(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracies and differences to 2 decimals; counts and text as they are."""
    rounded = df.copy()
    for column in rounded.columns:
        if column.startswith(("accuracy", "ci95", "seed_std", "episode_ci95", "diff_vs_", "reference_a", "reference_c")):
            rounded[column] = pd.to_numeric(rounded[column]).round(2)
        if column.startswith("seeds_") and column != "seeds":
            rounded[column] = pd.to_numeric(rounded[column]).astype("Int64")
    return rounded


def write_summary(summary: pd.DataFrame, per_seed: pd.DataFrame, *, csv_path, per_seed_csv_path, md_path,
                  rst_path=None) -> None:
    """Write ``summary.csv``, the per-seed CSV, ``summary.md`` (and the report's RST), atomically."""
    baseline = _baseline_of(summary)
    with atomic_path(csv_path) as tmp:
        _round(summary).to_csv(tmp, index=False)
    with atomic_path(per_seed_csv_path) as tmp:
        _round(per_seed).to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(summary_markdown(summary, baseline))
    if rst_path is not None:
        with atomic_path(rst_path) as tmp:
            tmp.write_text(summary_rst(summary, baseline))


def _pm(value, interval, signed: bool = False, decimals: int = 2) -> str:
    if value is None or pd.isna(value):
        return ""
    sign = "+" if signed else ""
    if interval is None or pd.isna(interval):
        return f"{value:{sign}.{decimals}f}"
    return f"{value:{sign}.{decimals}f} ± {interval:.{decimals}f}"


def _table_cells(summary: pd.DataFrame, baseline: str) -> tuple[list[str], list[list[str]], list[str]]:
    """Titles, rows and reference sources of the readable summary table (Markdown and RST share it)."""
    sources = [s for s in dict.fromkeys(summary["reference_source"]) if isinstance(s, str) and s]
    # a "trained on" column only when some row was trained elsewhere: in-domain tables read as before
    transfer = _has_transfer(summary)
    titles = ["trained on"] * transfer + ["dataset", "backbone", "shot", "method", "seeds", "accuracy (%)",
                                          "episode interval", f"vs {baseline} (pp)", f"seeds above {baseline}",
                                          "published (%)"]
    rows = []
    for row in summary.itertuples(index=False):
        row = row._asdict()
        published = _pm(row["reference_accuracy"], row["reference_ci95"], decimals=1)
        if published:
            published += f" [{sources.index(row['reference_source']) + 1}]"
        above = row[f"seeds_above_{baseline}"]
        rows.append([row[TRAINED_ON]] * transfer + [
            row["dataset"], row["backbone"], row["shot"], row["method"], row["n_seeds"],
            _pm(row["accuracy"], row["ci95"]), f"± {row['episode_ci95']:.2f}",
            _pm(row[f"diff_vs_{baseline}"], row[f"diff_vs_{baseline}_ci95"], signed=True),
            "" if pd.isna(above) else f"{int(above)} of {int(row[f'seeds_paired_with_{baseline}'])}", published,
        ])
    return titles, [[str(c) for c in r] for r in rows], sources


def _protocol_line(summary: pd.DataFrame) -> str:
    first = summary.iloc[0]
    seeds = sorted({int(s) for cell in summary["seeds"] for s in str(cell).split()})
    return (f"{first['way']}-way, {first['query']} queries per class, {first['episodes']} fixed test episodes "
            f"(episode seed {first['episode_seed']}), training seeds {', '.join(map(str, seeds))}.")


def _has_transfer(summary: pd.DataFrame) -> bool:
    return bool((summary[TRAINED_ON] != summary["dataset"]).any())


def _explanation(baseline: str, transfer: bool = False) -> list[str]:
    transfer_note = [
        "**trained on** is the dataset whose training (pre-training, meta-training) produced the models; "
        "**dataset** is the test data. Where they differ the row is a transfer row: the models trained on "
        "the first dataset scored on the saved test episodes of the second (the same episodes for every "
        f"source), its **vs {baseline}** paired with `{baseline}` trained on the same dataset, seed by seed. "
        "No published figure applies to them.",
    ] if transfer else []
    return [
        "**accuracy** is the mean over training seeds of each run's mean test accuracy, ± the 95% "
        f"interval over seeds `{SEED_INTERVAL}` (Student t, n_seeds-1 degrees of freedom): the "
        "spread a rerun with other seeds would show. With one seed there is no such interval "
        "(training variance not measured).",
        "**episode interval** is the reference code's interval `1.96*std/sqrt(n)` over the test episodes "
        "of the seed-averaged per-episode accuracies: test-episode sampling only.",
        f"**vs {baseline}** is the paired difference to `{baseline}` in percentage points: per seed, the mean "
        f"over the same episodes of method minus `{baseline}` (same pre-trained encoder), then the mean over "
        f"the seeds both ran ± its t-interval over those paired seeds; **seeds above** counts the paired "
        f"seeds where the method scored higher, out of all paired seeds (`seeds_paired_with_{baseline}` in "
        f"summary.csv: fewer than **seeds** when `{baseline}` lacks some of the method's seeds).",
        "**Published** figures are from the papers under their own protocol (5-way only, see the notes); "
        "their intervals are not comparable with ours.",
    ] + transfer_note


def summary_markdown(summary: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The summary as Markdown: how to read it, the table, the verdicts, then reference sources."""
    titles, rows, sources = _table_cells(summary, baseline)
    lines = ["# Few-shot test results", "", _protocol_line(summary), ""]
    lines += [f"- {text}" for text in _explanation(baseline, _has_transfer(summary))] + [""]
    lines += ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    sentences = verdict_sentences(summary, baseline)
    if sentences:
        lines += ["", "## Verdicts", ""] + [f"- {s}" for s in sentences]
    if sources:
        lines += [""] + [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    return "\n".join(lines) + "\n"


#: Columns of the report's front page (``summary_rst``), one table per trained-on/dataset/backbone.
#: Snakemake's report draws the front page in a column 32 rem (512 px) wide next to the workflow
#: graph: the full table of ``summary.md`` overflowed it under the graph and wrapped every number.
#: The episode interval and the seeds-above count stay in summary.md and summary.csv; the verdicts
#: below the table repeat each paired difference with its seed count. ``seeds`` is shown only when
#: rows ran different seeds (otherwise the protocol line above says them): with it, a long method
#: name such as ``mtl_no_pretrain`` no longer fits.
FRONT_PAGE_COLUMNS = ("shot", "method", "seeds", "accuracy (%)", "vs {baseline} (pp)", "published (%)")
#: Joins the parts of a front-page cell ("60.63 ± 5.29"), so a browser cannot wrap a number.
NBSP = "\u00a0"


def _rst_table(titles: list[str], rows: list[list[str]], caption: str) -> list[str]:
    """A ``.. table::`` directive holding a simple table, the caption as its title."""
    cells = [titles] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(titles))]
    rule = "  ".join("=" * w for w in widths)

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    body = [rule, line(titles), rule] + [line(r) for r in rows] + [rule]
    return [f".. table:: {caption}", ""] + ["   " + text for text in body] + [""]


def summary_rst(summary: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The summary and verdicts as reStructuredText, for the front page of ``snakemake --report``.

    A compact table (:data:`FRONT_PAGE_COLUMNS`, the same cells as summary.md) per trained-on, dataset
    and backbone, each cell's spaces non-breaking; the explanations and verdicts as in summary.md.
    """
    titles, rows, sources = _table_cells(summary, baseline)
    same_seeds = summary["seeds"].nunique() == 1
    shown = [titles.index(title.format(baseline=baseline)) for title in FRONT_PAGE_COLUMNS
             if not (title == "seeds" and same_seeds)]
    group_of = [titles.index(title) for title in ("dataset", "backbone")]
    trained_on = titles.index("trained on") if "trained on" in titles else None
    groups: dict[tuple, list[list[str]]] = {}
    for r in rows:
        source = r[trained_on] if trained_on is not None else r[group_of[0]]
        groups.setdefault((source,) + tuple(r[i] for i in group_of), []).append(
            [r[i].replace(" ", NBSP) for i in shown])

    lines = ["Few-shot test results", "=====================", "", _protocol_line(summary), ""]
    for (source, dataset, backbone), group in groups.items():
        tested = dataset if source == dataset else f"trained on {source}, tested on {dataset}"
        lines += _rst_table([titles[i] for i in shown], group, f"{tested}, {backbone}")
    lines += [f"The episode interval and **seeds above {baseline}** of each row are in results/summary.md "
              "and results/summary.csv; the verdicts below give each paired difference with its seeds.", ""]
    lines += [f"- {text}".replace("`", "``") for text in _explanation(baseline, _has_transfer(summary))] + [""]
    sentences = verdict_sentences(summary, baseline)
    if sentences:
        lines += ["Verdicts", "--------", ""] + [f"- {s}" for s in sentences] + [""]
    lines += [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    return "\n".join(lines) + "\n"


def summarize_runs(
    metrics_files: Sequence,
    episode_files: Sequence,
    history_files: Sequence,
    *,
    csv_out,
    per_seed_csv_out,
    md_out,
    accuracy_plot,
    history_plot,
    rst_out=None,
    baseline: str = BASELINE,
) -> pd.DataFrame:
    """Everything the summarize step writes: the tables (CSV, per-seed CSV, Markdown, RST) and plots."""
    from mtl.plots import plot_accuracies, plot_histories

    if len(metrics_files) != len(episode_files):
        raise ValueError("every metrics.json needs its episodes.csv (the lists differ in length)")
    runs = load_runs(list(zip(metrics_files, episode_files)))
    summary, per_seed = build_summary(runs, baseline=baseline), per_seed_table(runs, baseline=baseline)
    write_summary(summary, per_seed, csv_path=csv_out, per_seed_csv_path=per_seed_csv_out, md_path=md_out,
                  rst_path=rst_out)
    for sentence in verdict_sentences(summary, baseline):
        log.info("%s", sentence)
    plot_accuracies(summary, per_seed, accuracy_plot)
    plot_histories(history_files, history_plot)
    return summary
