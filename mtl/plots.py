"""The report's plots: per-seed test accuracies with the across-seed interval, the reliability of the
calibrated probabilities, and training curves as a band over seeds. Matplotlib's object API on the
Agg canvas (no pyplot, no GUI state).

Inputs are the tables of :mod:`mtl.results.tables` and the ``history.csv`` files of the training rules,
whose paths name the run: ``results/<dataset>/<backbone>/seed<N>/pretrain/history.csv`` and
``results/<dataset>/<backbone>/seed<N>/<method>/<shot>shot/history.csv``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mtl.errors import DataError, MTLError
from mtl.io import atomic_path
from mtl.results.runs import ROW_KEY, TRAINED_ON, read_csv_table
from mtl.stats import SEED_INTERVAL

LOSS_COLUMNS = ("train_loss", "meta_loss", "loss")
_SEED_PART = re.compile(r"seed(\d+)$")


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


def _panel_grid(summary: pd.DataFrame, plot: str, path_png, height: float):
    """A figure with one panel per (trained on, tested on) dataset pair (rows) x shot (columns): the
    figure, its axes, and (axes, (trained_on, dataset, shot), summary rows) of every panel that has
    rows; a panel without rows is hidden."""
    if summary.empty:
        raise MTLError(f"{plot}({path_png}): the summary table is empty; nothing to plot")
    pairs = list(dict.fromkeys(zip(summary[TRAINED_ON], summary["dataset"])))
    shots = sorted(dict.fromkeys(summary["shot"]))
    figure, axes = _figure(len(pairs), len(shots), 4.4, height)
    panels = []
    for i, (trained_on, dataset) in enumerate(pairs):
        for j, shot in enumerate(shots):
            rows = summary[(summary[TRAINED_ON] == trained_on) & (summary["dataset"] == dataset)
                           & (summary["shot"] == shot)]
            if rows.empty:
                axes[i][j].set_visible(False)
            else:
                panels.append((axes[i][j], (trained_on, dataset, shot), rows))
    return figure, axes, panels


# ----------------------------------------------------------------------------- test accuracy
def plot_accuracies(summary: pd.DataFrame, per_seed: pd.DataFrame, path_png) -> Path:
    """Per (trained on, tested on) dataset x shot: each seed's accuracy as a point, the across-seed
    mean ± t-interval, published marks. A transfer pair (models of one dataset scored on another)
    gets its own row of panels, after the in-domain ones."""
    figure, axes, panels = _panel_grid(summary, "plot_accuracies", path_png, height=3.6)
    for ax, (trained_on, dataset, shot), rows in panels:
        seeds = per_seed[(per_seed[TRAINED_ON] == trained_on) & (per_seed["dataset"] == dataset)
                         & (per_seed["shot"] == shot)]
        _accuracy_panel(ax, rows, seeds, summary["backbone"].nunique() > 1)
    _shared_legend(figure, axes)
    figure.suptitle(f"Test accuracy: one point per training seed, mean ± {SEED_INTERVAL}", fontsize="medium")
    return _save_png(figure, path_png)


def _accuracy_panel(ax, rows: pd.DataFrame, seeds: pd.DataFrame, several_backbones: bool) -> None:
    x = np.arange(len(rows))
    for position, row in zip(x, rows.itertuples()):
        mine = seeds[(seeds["method"] == row.method) & (seeds["backbone"] == row.backbone)]
        jitter = np.linspace(-0.12, 0.12, len(mine)) if len(mine) > 1 else np.zeros(len(mine))
        ax.scatter(position + jitter, mine["accuracy"], s=14, color="tab:blue", alpha=0.55,
                   label="one training seed")
        ax.errorbar(position, row.accuracy, yerr=None if pd.isna(row.ci95) else row.ci95, fmt="o",
                    color="black", capsize=5, markersize=5, label="mean ± interval over seeds")
    published = rows["reference_accuracy"].notna().to_numpy()
    if published.any():
        ax.errorbar(x[published] + 0.3, rows["reference_accuracy"][published], yerr=rows["reference_ci95"][published],
                    fmt="D", color="tab:red", capsize=3, label="published (other protocol)")
    first = rows.iloc[0]
    where = (first["dataset"] if first[TRAINED_ON] == first["dataset"]
             else f"trained on {first[TRAINED_ON]}, tested on {first['dataset']}")
    ax.set_title(f"{where}: {first['way']}-way {first['shot']}-shot, {int(first['n_seeds'])} seed(s)\n"
                 f"{first['query']} queries/class, {first['episodes']} episodes", fontsize="medium")
    labels = [f"{r.method}\n{r.backbone}" if several_backbones else r.method for r in rows.itertuples()]
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("accuracy (%)")
    ax.axhline(100.0 / first["way"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.grid(axis="y", alpha=0.3)


def _shared_legend(figure, axes) -> None:
    """One legend for the figure, each label once."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        figure.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=len(seen), fontsize="small")


# ----------------------------------------------------------------------------- reliability
def plot_reliability(summary: pd.DataFrame, reliability: Mapping[tuple, Mapping], path_png) -> Path:
    """Per (trained on, tested on) dataset x shot, one line per method: the accuracy against the mean
    confidence of each confidence bin, the test queries of all seeds pooled (``reliability``:
    :func:`mtl.results.tables.pooled_reliability`), the diagonal of perfect calibration, and the
    pooled queries' ECE in the legend. A row without a table (evaluated before calibration existed)
    is left out; a panel left empty says so."""
    figure, _, panels = _panel_grid(summary, "plot_reliability", path_png, height=4.2)
    for ax, _, rows in panels:
        _reliability_panel(ax, rows, reliability, summary["backbone"].nunique() > 1)
    figure.suptitle("Reliability of the calibrated probabilities: accuracy vs mean confidence per confidence bin\n"
                    "(test queries of all seeds pooled; ECE in points)", fontsize="medium")
    return _save_png(figure, path_png)


def _reliability_panel(ax, rows: pd.DataFrame, reliability: Mapping[tuple, Mapping], several_backbones: bool) -> None:
    first = rows.iloc[0]
    ax.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    drawn = []
    for row in rows.itertuples(index=False):
        table = reliability.get(tuple(getattr(row, field) for field in ROW_KEY))
        if table is None:
            continue
        count = np.asarray(table["count"], dtype=np.float64)
        filled = count > 0  # an empty bin has no accuracy
        confidence = 100.0 * np.asarray(table["confidence"])[filled] / count[filled]
        accuracy = 100.0 * np.asarray(table["correct"])[filled] / count[filled]
        name = f"{row.method} {row.backbone}" if several_backbones else row.method
        ax.plot(confidence, accuracy, marker="o", markersize=3.5, label=f"{name} (ECE {table['ece']:.1f})")
        drawn.append(table)
    where = (first["dataset"] if first[TRAINED_ON] == first["dataset"]
             else f"trained on {first[TRAINED_ON]}, tested on {first['dataset']}")
    bins = drawn[0]["bins"] if drawn else None
    detail = (f"per seed {first['episodes']} episodes x {first['way'] * first['query']} queries, {bins} bins"
              if drawn else "no reliability table recorded: rerun evaluate")
    ax.set_title(f"{where}: {first['way']}-way {first['shot']}-shot\n{detail}", fontsize="medium")
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="mean confidence in the bin (%)", ylabel="accuracy in the bin (%)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    # below the panel: a method's line can run through any corner of it
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)


# ----------------------------------------------------------------------------- training curves
def history_run(path) -> tuple[str, int | None]:
    """('fc100 mtl 1shot', 2) from results/fc100/<backbone>/seed2/mtl/1shot/history.csv; ('fc100 pretrain', 2)."""
    parts = Path(path).parts
    seed_at = next((i for i in range(len(parts) - 1, -1, -1) if _SEED_PART.match(parts[i])), None)
    if seed_at is None or seed_at < 2:
        return str(path), None
    seed = int(_SEED_PART.match(parts[seed_at]).group(1))
    dataset, run = parts[seed_at - 2], [p for p in parts[seed_at + 1:-1]]
    return " ".join([dataset, *run]), seed


def _read_history(path) -> pd.DataFrame:
    path = Path(path)
    history = read_csv_table(path, "history file", "rerun the training step that writes it")
    if "epoch" not in history.columns or history.empty:
        raise DataError(f"history file {path}: expected an 'epoch' column and at least one row, "
                        f"found columns {list(history.columns)} and {len(history)} rows")
    if "val_acc" not in history.columns and not any(c in history.columns for c in LOSS_COLUMNS):
        raise DataError(f"history file {path}: nothing to plot; expected val_acc or one of {list(LOSS_COLUMNS)}, "
                        f"found {list(history.columns)}")
    return history


def _by_run(history_files: Sequence) -> dict[str, list[pd.DataFrame]]:
    runs: dict[str, list[pd.DataFrame]] = {}
    for path in history_files:
        label, _ = history_run(path)
        runs.setdefault(label, []).append(_read_history(path))
    return runs


def _over_seeds(histories: list[pd.DataFrame], column: str) -> pd.DataFrame | None:
    """Mean, min and max of ``column`` per epoch over the seeds that have it (val_acc shown in %)."""
    frames = [h.set_index("epoch")[column].astype(float) for h in histories if column in h.columns]
    if not frames:
        return None
    table = pd.concat(frames, axis=1, ignore_index=True)
    values = table.to_numpy()
    if column == "val_acc" and np.nanmin(values) >= 0.0 and np.nanmax(values) <= 1.0:
        table = table * 100.0
    return pd.DataFrame({"mean": table.mean(axis=1), "low": table.min(axis=1), "high": table.max(axis=1),
                         "n": table.notna().sum(axis=1)})


def plot_histories(history_files: Sequence, path_png) -> Path:
    """Validation accuracy (%) and training loss per epoch, one line per run: the mean over its
    training seeds, with a band from the lowest to the highest seed."""
    if not history_files:
        raise MTLError(f"plot_histories({path_png}): no history files given")
    runs = _by_run(history_files)
    has_loss = any(c in h.columns for hs in runs.values() for h in hs for c in LOSS_COLUMNS)
    figure, axes = _figure(1, 2 if has_loss else 1, 5.5, 3.8)
    for label, histories in runs.items():
        color, seeds = None, len(histories)
        curve = _over_seeds(histories, "val_acc")
        if curve is not None:
            color = _band(axes[0][0], curve, f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
        loss_column = next((c for c in LOSS_COLUMNS if any(c in h.columns for h in histories)), None)
        if loss_column is not None:
            _band(axes[0][1], _over_seeds(histories, loss_column), f"{label} ({loss_column})", color)
    from matplotlib.ticker import MaxNLocator  # importable here: _figure succeeded

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0][0].set(title="Validation accuracy: mean over seeds, band min-max", xlabel="epoch", ylabel="accuracy (%)")
    if has_loss:
        axes[0][1].set(title="Training loss: mean over seeds, band min-max", xlabel="epoch",
                       ylabel="loss (cross-entropy)")
    return _save_png(figure, path_png)


def _band(ax, curve: pd.DataFrame, label: str, color=None):
    (line,) = ax.plot(curve.index, curve["mean"], color=color, marker="." if len(curve) < 30 else None, label=label)
    if (curve["n"] > 1).any():
        ax.fill_between(curve.index, curve["low"], curve["high"], color=line.get_color(), alpha=0.2)
    return line.get_color()


