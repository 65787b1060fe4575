"""The numbers users read: per-run accuracy with a 95% interval, paired differences, the summary table
and the report plots.

Pure functions over pandas/numpy (no torch, no Snakemake), in the spirit of imagenet's ``accuracy()``.

Interval convention (the MTL reference code's): ``ci95 = 1.96 * std / sqrt(n)`` with ``std`` the
*population* standard deviation (``ddof=0``) of the per-episode accuracies and ``n`` the number of test
episodes. Every row carries its protocol (way, shot, query, episodes, seed, backbone) and this formula,
so numbers from different protocols cannot be read as comparable by accident.

Every method of a dataset/shot is scored on the *same* saved test episodes (same ``episodes_sha256``), so
a difference between two methods comes with a *paired* interval (the interval of the per-episode
differences), which is much tighter than two overlapping per-method intervals.

Files (one run = one dataset x backbone x method x shot):
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

from mtl.errors import ConfigError, DataError, MTLError
from mtl.io import atomic_path

log = logging.getLogger(__name__)

INTERVAL_FORMULA = "1.96*std/sqrt(n)"
Z_95 = 1.96
METHOD_ORDER = ("ft", "proto", "mtl", "mtl_ht")
BASELINE = "ft"

#: Keys ``metrics.json`` must hold, in the order they are written.
METRICS_KEYS = (
    "dataset", "backbone", "method", "way", "shot", "query", "episodes", "seed",
    "episodes_file", "episodes_sha256", "accuracy", "ci95", "interval", "std",
)
#: What the caller of :func:`write_episode_results` must supply (the rest is computed).
PROTOCOL_KEYS = (
    "dataset", "backbone", "method", "way", "shot", "query", "seed", "episodes_file", "episodes_sha256",
)
#: Fields that must agree between two runs of one dataset/shot before they share a table or a pairing.
COMPARED_FIELDS = ("way", "query", "episodes", "seed", "episodes_sha256")
ROW_KEY = ("dataset", "backbone", "method", "shot")

_TF_PROTOCOL_NOTE = "its TF meta-test used queries per class = shot, so its interval is not comparable with ours"
#: Published 5-way accuracies (REFERENCE.md section 4), % mean and 95% interval, per method.
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


def summary_columns(baseline: str = BASELINE) -> list[str]:
    """Column order of the summary table (``diff_vs_<baseline>`` names follow the baseline)."""
    return [
        "dataset", "backbone", "method", "way", "shot", "query", "episodes", "seed",
        "accuracy", "ci95", "interval", f"diff_vs_{baseline}", f"diff_vs_{baseline}_ci95",
        "reference_accuracy", "reference_ci95", "reference_source",
    ]


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
    data and, if also given, must match it. Extra protocol keys are kept in the JSON after the standard ones.
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
    metrics = {key: _plain(metrics[key]) for key in METRICS_KEYS}
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
    """Load a ``metrics.json``, checking it holds every key of :data:`METRICS_KEYS`."""
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
    return metrics


def read_episode_accuracies(path) -> pd.Series:
    """Per-episode accuracies (fractions) of ``episodes.csv``, indexed by episode id."""
    path = Path(path)
    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"episodes file {path} does not exist; run the evaluate step for it") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"episodes file {path} is not a readable CSV ({error}); rerun evaluate") from None
    if not {"episode", "accuracy"} <= set(table.columns):
        raise DataError(f"episodes file {path}: expected columns episode, accuracy; found {list(table.columns)}")
    if table["episode"].duplicated().any():
        raise DataError(f"episodes file {path}: episode ids repeat; rerun evaluate")
    _as_fractions(table["accuracy"].to_numpy(), f"episodes file {path}")
    return pd.Series(table["accuracy"].to_numpy(dtype=np.float64), index=table["episode"].astype(np.int64))


# ----------------------------------------------------------------------------- summary table
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
        return tuple(self.metrics[field] for field in ROW_KEY)

    @property
    def files(self) -> str:
        return f"{self.metrics_path} (+ {self.episodes_path.name})"

    def _check_files_agree(self) -> None:
        """metrics.json and episodes.csv must come from the same evaluation (not a stale mix)."""
        count, mean = len(self.episodes), float(self.episodes.mean() * 100.0)
        if count != int(self.metrics["episodes"]) or abs(mean - float(self.metrics["accuracy"])) > 0.01:
            raise DataError(
                f"{self.metrics_path} says {self.metrics['episodes']} episodes at {self.metrics['accuracy']:.2f}% "
                f"but {self.episodes_path} holds {count} episodes at {mean:.2f}%; they come from different "
                "evaluations: rerun the evaluate step for this run"
            )


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


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def reference_for(method: str, dataset: str, shot: int, way: int) -> tuple[float, float, str] | None:
    """Published (accuracy %, ci95 %, source) for this row, or None (only for 5-way rows)."""
    entry = REFERENCE_ACCURACIES.get(method)
    if entry is None or int(way) != REFERENCE_WAY:
        return None
    values = entry["values"].get((str(dataset).lower(), int(shot)))
    return None if values is None else (values[0], values[1], entry["source"])


def build_summary(runs: Iterable[Sequence], *, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per dataset x backbone x method x shot from ``(metrics_json, episodes_csv)`` pairs.

    Refuses duplicate rows and runs of one dataset/shot whose protocol (:data:`COMPARED_FIELDS`)
    differs. ``diff_vs_<baseline>`` is the paired difference (percentage points) against the
    baseline run of the same dataset/backbone/shot; empty for the baseline itself or when it is
    missing. Values are full precision; :func:`write_summary` rounds.
    """
    loaded = [_Run(*pair) for pair in runs]
    if not loaded:
        raise ConfigError("build_summary: no runs given; evaluate at least one dataset/method/shot first")
    by_key: dict[tuple, _Run] = {}
    first_of_group: dict[tuple, _Run] = {}
    for run in loaded:
        if run.key in by_key:
            raise ConfigError(
                f"two runs for {dict(zip(ROW_KEY, run.key))}: {by_key[run.key].metrics_path} and "
                f"{run.metrics_path}; pass each run once"
            )
        by_key[run.key] = run
        group = (run.metrics["dataset"], run.metrics["shot"])
        if group in first_of_group:
            _check_same_protocol(first_of_group[group], run)
        else:
            first_of_group[group] = run

    rows = [_summary_row(run, by_key, baseline) for run in loaded]
    table = pd.DataFrame(rows, columns=summary_columns(baseline))
    table["_rank"] = [_method_rank(m)[0] for m in table["method"]]
    table = table.sort_values(["dataset", "backbone", "shot", "_rank", "method"], kind="stable")
    return table.drop(columns="_rank").reset_index(drop=True)


def _summary_row(run: _Run, by_key: Mapping[tuple, _Run], baseline: str) -> dict:
    m = run.metrics
    row = {field: m[field] for field in ("dataset", "backbone", "method", "way", "shot", "query", "episodes", "seed")}
    row.update(accuracy=float(m["accuracy"]), ci95=float(m["ci95"]), interval=m["interval"])
    diff = ci = math.nan
    base = by_key.get((m["dataset"], m["backbone"], baseline, m["shot"]))
    if base is not None and base is not run:
        _check_same_protocol(base, run)
        diff, ci = paired_difference(run.episodes.to_numpy(), base.episodes.loc[run.episodes.index].to_numpy())
    row[f"diff_vs_{baseline}"], row[f"diff_vs_{baseline}_ci95"] = diff, ci
    reference = reference_for(m["method"], m["dataset"], m["shot"], m["way"])
    row["reference_accuracy"], row["reference_ci95"], row["reference_source"] = (
        reference if reference is not None else (math.nan, math.nan, "")
    )
    return row


# ----------------------------------------------------------------------------- summary files
def _baseline_of(df: pd.DataFrame) -> str:
    names = [c[len("diff_vs_"):] for c in df.columns if c.startswith("diff_vs_") and not c.endswith("_ci95")]
    if len(names) != 1:
        raise ConfigError(f"summary table: expected one diff_vs_<baseline> column, found columns {list(df.columns)}")
    return names[0]


def write_summary(df: pd.DataFrame, csv_path, md_path) -> None:
    """Write ``summary.csv`` (accuracies rounded to 2 decimals) and a readable ``summary.md``, atomically."""
    baseline = _baseline_of(df)
    rounded = df.copy()
    for column in ("accuracy", "ci95", f"diff_vs_{baseline}", f"diff_vs_{baseline}_ci95",
                   "reference_accuracy", "reference_ci95"):
        rounded[column] = pd.to_numeric(rounded[column]).round(2)
    with atomic_path(csv_path) as tmp:
        rounded.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(summary_markdown(df, baseline))


def _pm(value, interval, signed: bool = False, decimals: int = 2) -> str:
    if value is None or pd.isna(value):
        return ""
    sign = "+" if signed else ""
    return f"{value:{sign}.{decimals}f} ± {interval:.{decimals}f}"


def summary_markdown(df: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The summary as Markdown: a paragraph on how to read it, the table, then reference sources."""
    sources = [s for s in dict.fromkeys(df["reference_source"]) if isinstance(s, str) and s]
    header = [
        "# Few-shot test results", "",
        "Each row is one dataset x backbone x method x shot, scored on a fixed, saved set of test episodes. "
        "Protocol columns: **way** classes per episode, **shot** labelled images per class, **query** test "
        "images per class, **episodes** number of test episodes, **seed** the episode-sampling seed. "
        f"**Accuracy** is the mean per-episode accuracy in %, ± its 95% interval `{INTERVAL_FORMULA}` "
        "(std: population std of the per-episode accuracies, n: episodes).", "",
        f"**vs {baseline} (pp)** is the paired difference to the `{baseline}` run of the same "
        f"dataset/backbone/shot, in percentage points, ± the 95% interval of the per-episode differences "
        "(same episodes for both, so the episode difficulty both share cancels out). An interval that "
        "excludes 0 means the difference is not episode-sampling noise; it is empty for the baseline "
        "itself or when no baseline run exists.", "",
        "**Published** figures are from the papers under their own protocol (5-way only; see the notes "
        "under the table); their intervals are not comparable with ours.", "",
    ]
    titles = ["dataset", "backbone", "shot", "method", "way", "query", "episodes", "seed",
              "accuracy (%)", f"vs {baseline} (pp)", "published (%)"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in df.itertuples(index=False):
        row = row._asdict()
        published = _pm(row["reference_accuracy"], row["reference_ci95"], decimals=1)
        if published:
            published += f" [{sources.index(row['reference_source']) + 1}]"
        cells = [row["dataset"], row["backbone"], row["shot"], row["method"], row["way"], row["query"],
                 row["episodes"], row["seed"], _pm(row["accuracy"], row["ci95"]),
                 _pm(row[f"diff_vs_{baseline}"], row[f"diff_vs_{baseline}_ci95"], signed=True), published]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = [""] + [f"[{i}] {source}" for i, source in enumerate(sources, 1)] if sources else []
    return "\n".join(header + lines + notes) + "\n"


# ----------------------------------------------------------------------------- plots
def _figure(nrows: int, ncols: int, width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot, no GUI, no global backend state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MTLError(
            "the report plots need matplotlib, which is not installed in this environment; "
            "install it (pip install matplotlib, or add matplotlib to envs/mtl.yaml)"
        ) from None
    figure = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def _save_png(figure, path_png) -> Path:
    with atomic_path(path_png) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return Path(path_png)


def plot_accuracies(df: pd.DataFrame, path_png) -> Path:
    """Accuracy ± 95% interval per method, one panel per dataset x shot, published figure marked."""
    if df.empty:
        raise MTLError(f"plot_accuracies({path_png}): the summary table is empty; nothing to plot")
    datasets = list(dict.fromkeys(df["dataset"]))
    shots = sorted(dict.fromkeys(df["shot"]))
    several_backbones = df["backbone"].nunique() > 1
    figure, axes = _figure(len(datasets), len(shots), 4.2, 3.4)
    for i, dataset in enumerate(datasets):
        for j, shot in enumerate(shots):
            panel = df[(df["dataset"] == dataset) & (df["shot"] == shot)]
            if panel.empty:
                axes[i][j].set_visible(False)
                continue
            _accuracy_panel(axes[i][j], panel, dataset, shot, several_backbones)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    figure.suptitle(f"Test accuracy, mean ± 95% interval ({INTERVAL_FORMULA})")
    return _save_png(figure, path_png)


def _accuracy_panel(ax, panel: pd.DataFrame, dataset: str, shot: int, several_backbones: bool) -> None:
    x = np.arange(len(panel))
    labels = [f"{r.method}\n{r.backbone}" if several_backbones else r.method for r in panel.itertuples()]
    bars = ax.bar(x, panel["accuracy"], yerr=panel["ci95"], capsize=4, color="tab:blue", alpha=0.8,
                  label="ours (± 95% interval)")
    ax.bar_label(bars, labels=[f"{a:.1f}" for a in panel["accuracy"]], label_type="center",
                 color="white", fontsize="small")
    reference = panel["reference_accuracy"].notna().to_numpy()
    if reference.any():
        ax.errorbar(x[reference] + 0.25, panel["reference_accuracy"][reference], yerr=panel["reference_ci95"][reference],
                    fmt="D", color="tab:red", capsize=3, label="published (other protocol)")
    way, query, episodes = panel.iloc[0][["way", "query", "episodes"]]
    ax.set_title(f"{dataset}: {way}-way {shot}-shot\n{query} queries/class, {episodes} episodes", fontsize="medium")
    ax.set_xticks(x, labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axhline(100.0 / way, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.grid(axis="y", alpha=0.3)


LOSS_COLUMNS = ("train_loss", "meta_loss", "loss")


def _read_history(path) -> pd.DataFrame:
    path = Path(path)
    try:
        history = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"history file {path} does not exist; run the training step that writes it") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"history file {path} is not a readable CSV ({error})") from None
    if "epoch" not in history.columns or history.empty:
        raise DataError(f"history file {path}: expected an 'epoch' column and at least one row, "
                        f"found columns {list(history.columns)} and {len(history)} rows")
    if "val_acc" not in history.columns and not any(c in history.columns for c in LOSS_COLUMNS):
        raise DataError(f"history file {path}: nothing to plot; expected val_acc or one of {list(LOSS_COLUMNS)}, "
                        f"found {list(history.columns)}")
    return history


def plot_histories(history_csvs: Mapping[str, str | os.PathLike], path_png) -> Path:
    """Training curves: validation accuracy (%, with its interval band) and loss vs epoch, one line per run.

    ``val_acc``/``val_ci95`` whose values all lie in 0..1 are read as fractions and shown in %.
    The loss is the first of :data:`LOSS_COLUMNS` a file has.
    """
    if not history_csvs:
        raise MTLError(f"plot_histories({path_png}): no history files given")
    histories = {label: _read_history(path) for label, path in history_csvs.items()}
    has_loss = any(c in h.columns for h in histories.values() for c in LOSS_COLUMNS)
    figure, axes = _figure(1, 2 if has_loss else 1, 5.5, 3.8)
    acc_ax = axes[0][0]
    for label, history in histories.items():
        line = None
        if "val_acc" in history.columns:
            line = _plot_val_acc(acc_ax, history, label)
        loss_column = next((c for c in LOSS_COLUMNS if c in history.columns), None)
        if loss_column is not None:
            color = line.get_color() if line is not None else None
            axes[0][1].plot(history["epoch"], history[loss_column], color=color, label=f"{label} ({loss_column})")
    from matplotlib.ticker import MaxNLocator  # importable here: _figure succeeded

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set(title="Validation accuracy (± 95% interval)", xlabel="epoch", ylabel="accuracy (%)")
    acc_ax.grid(alpha=0.3)
    if acc_ax.lines:
        acc_ax.legend(fontsize="small")
    if has_loss:
        loss_ax = axes[0][1]
        loss_ax.set(title="Training loss", xlabel="epoch", ylabel="loss (cross-entropy)")
        loss_ax.grid(alpha=0.3)
        loss_ax.legend(fontsize="small")
    return _save_png(figure, path_png)


def _plot_val_acc(ax, history: pd.DataFrame, label: str):
    values = history["val_acc"].astype(float)
    scale = 100.0 if values.dropna().between(0.0, 1.0).all() else 1.0
    (line,) = ax.plot(history["epoch"], values * scale, marker="." if len(history) < 30 else None, label=label)
    if "val_ci95" in history.columns:
        band = history["val_ci95"].astype(float) * scale
        ax.fill_between(history["epoch"], values * scale - band, values * scale + band,
                        color=line.get_color(), alpha=0.2)
    return line


def summarize_runs(
    metrics_files: Sequence,
    episode_files: Sequence,
    history_files: Sequence,
    *,
    csv_out,
    md_out,
    accuracy_plot,
    history_plot,
    baseline: str = BASELINE,
) -> pd.DataFrame:
    """Everything the summarize step writes: the table (CSV and Markdown) and the report's plots."""
    if len(metrics_files) != len(episode_files):
        raise ValueError("every metrics.json needs its episodes.csv (the lists differ in length)")
    df = build_summary(list(zip(metrics_files, episode_files)), baseline=baseline)
    write_summary(df, csv_out, md_out)
    plot_accuracies(df, accuracy_plot)
    plot_histories({history_label(path): path for path in history_files}, history_plot)
    return df


def history_label(path) -> str:
    """'fc100 mtl 1shot' from results/fc100/<backbone>/mtl/1shot/history.csv (and 'fc100 pretrain')."""
    parts = Path(path).parts
    if len(parts) >= 4 and parts[-2] == "pretrain":
        return f"{parts[-4]} pretrain"
    if len(parts) >= 5:
        return f"{parts[-5]} {parts[-3]} {parts[-2]}"
    return str(path)
