"""The ablation table: every arm of :mod:`mtl.methods` against ``ft`` and ``mtl``, across seeds.

Built from the across-seed summaries of :mod:`mtl.results` (nothing is re-derived here):
``build_summary(runs, baseline="ft")`` gives each arm's mean over training seeds, its Student-t
interval over seeds and the paired difference to ``ft``; ``build_summary(runs, baseline="mtl")``
the paired difference to ``mtl``. Both pair runs of the same seed on the same saved episodes
(``load_runs`` refuses runs of one dataset/shot scored on different episode files).

``ablation.csv``: one row per arm, and for each dataset x shot the columns
``<dataset>_<shot>shot_<field>`` (:data:`GROUP_FIELDS`). ``ablation.md``: the same as three
tables (accuracy, difference to ft, difference to mtl), arms as rows, dataset x shot as columns.

``snakemake ablation`` scores in-domain runs only. Transfer runs given here (trained on one dataset,
tested on another) are kept apart, never mixed with the target's in-domain runs: they get their own
columns ``<trained_on>_to_<dataset>_<shot>shot_<field>``, paired with ft and mtl trained on the same
dataset, after the in-domain columns, and no paper figure. The paper's figures are those of
:mod:`mtl.published`, which the summary quotes too.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mtl.errors import ConfigError
from mtl.io import atomic_path
from mtl.methods import NAMES, get_method
from mtl.published import paper_figure
from mtl.results.render import plus_minus
from mtl.results.runs import ROW_KEY, TRAINED_ON, is_transfer, load_runs
from mtl.results.tables import build_summary
from mtl.stats import NOT_MEASURED, SEED_INTERVAL

log = logging.getLogger(__name__)

BASELINES = ("ft", "mtl")
#: Columns per dataset x shot in ablation.csv.
GROUP_FIELDS = (
    "n_seeds", "accuracy", "ci95",
    "diff_vs_ft", "diff_vs_ft_ci95", "seeds_paired_with_ft", "seeds_above_ft",
    "diff_vs_mtl", "diff_vs_mtl_ci95", "seeds_paired_with_mtl", "seeds_above_mtl",
    "paper_accuracy", "paper_source",
)


def ablation_long(runs: Sequence) -> pd.DataFrame:
    """One row per arm x dataset x backbone x shot: the across-seed summary against both baselines."""
    present = {run.metrics["method"] for run in runs}
    missing = [b for b in BASELINES if b not in present]
    if missing:
        raise ConfigError(f"the ablation table compares every arm with {list(BASELINES)}, but no run of "
                          f"{missing} was given; evaluate them too (snakemake ablation does)")
    against_ft, against_mtl = (build_summary(runs, baseline=b) for b in BASELINES)
    keep = list(ROW_KEY) + ["diff_vs_mtl", "diff_vs_mtl_ci95", "seeds_paired_with_mtl", "seeds_above_mtl"]
    table = against_ft.merge(against_mtl[keep], on=list(ROW_KEY), how="left", validate="one_to_one")
    papers = [None if is_transfer(r) else paper_figure(r["method"], r["dataset"], r["shot"], r["way"])
              for r in table.to_dict("records")]
    table["paper_accuracy"] = [np.nan if p is None else p[0] for p in papers]
    table["paper_source"] = ["" if p is None else p[1] for p in papers]
    return table.rename(columns={"method": "arm"})


def ablation_wide(long: pd.DataFrame) -> pd.DataFrame:
    """Arms as rows (registry order), ``<dataset>_<shot>shot_<field>`` columns (transfer runs:
    ``<trained_on>_to_<dataset>_<shot>shot_<field>``, after the in-domain ones)."""
    groups = (long[[TRAINED_ON, "dataset", "shot"]].drop_duplicates()
              .assign(_transfer=lambda g: g[TRAINED_ON] != g["dataset"])
              .sort_values(["_transfer", TRAINED_ON, "dataset", "shot"]))
    arms = [a for a in NAMES if a in set(long["arm"])] + sorted(set(long["arm"]) - set(NAMES))
    wide = pd.DataFrame({"arm": arms, "what": [_summary(a) for a in arms]})
    for trained_on, dataset, shot, transfer in groups.itertuples(index=False):
        cell = long[(long[TRAINED_ON] == trained_on) & (long["dataset"] == dataset)
                    & (long["shot"] == shot)].set_index("arm")
        prefix = f"{trained_on}_to_{dataset}" if transfer else dataset
        for field in GROUP_FIELDS:
            wide[f"{prefix}_{shot}shot_{field}"] = [cell[field].get(arm, np.nan) for arm in arms]
    return wide


def _summary(arm: str) -> str:
    return get_method(arm).summary if arm in NAMES else ""


def _groups(wide: pd.DataFrame) -> list[str]:
    return [c[: -len("_accuracy")] for c in wide.columns if c.endswith("shot_accuracy")]


def ablation_markdown(long: pd.DataFrame, wide: pd.DataFrame) -> str:
    """ablation.md: how to read it, then accuracy, vs ft and vs mtl tables, then the paper's sources."""
    groups = _groups(wide)
    titles = ["arm"] + [g.replace("_", " ") for g in groups]
    sources = [s for s in dict.fromkeys(long["paper_source"]) if s]
    first = long.iloc[0]
    seeds = sorted({int(s) for cell in long["seeds"] for s in str(cell).split()})
    lines = [
        "# Ablation: what is adapted, which meta-batch, which order", "",
        f"{first['backbone']}, {first['way']}-way, {first['query']} queries per class, {first['episodes']} fixed "
        f"test episodes per dataset and shot (episode seed {first['episode_seed']}), training seeds "
        f"{', '.join(map(str, seeds))}. Every arm and seed of a column was scored on the same saved episodes.", "",
        f"- **accuracy**: mean over training seeds ± the 95% interval over seeds `{SEED_INTERVAL}`; with one "
        f"seed no interval ({NOT_MEASURED}). *paper*: the published figure, where the paper reports the arm.",
        "- **vs ft / vs mtl**: paired difference in points, per seed on the same episodes (same encoder and "
        "seed), then the mean over the seeds both ran ± its t-interval over those seeds; (k/n): k of the n "
        "paired seeds where the arm scored higher (n can be below the arm's own seed count).",
        "",
    ]
    lines += _table("Accuracy (%)", titles, wide, groups, _accuracy_cell(sources))
    for baseline in BASELINES:
        lines += _table(f"Difference to {baseline} (points)", titles, wide, groups, _diff_cell(baseline))
    lines += ["## Arms", ""] + [f"- `{a}`: {w}" for a, w in zip(wide["arm"], wide["what"])] + [""]
    if sources:
        lines += ["## Paper figures", ""] + [f"[{i}] {s}" for i, s in enumerate(sources, 1)] + [""]
    else:
        lines += ["No published figure matches these columns (5-way miniImageNet/FC100 only).", ""]
    return "\n".join(lines)


def _table(title, titles, wide, groups, cell) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in wide.to_dict("records"):
        lines.append("| " + " | ".join([f"`{row['arm']}`"] + [cell(row, g) for g in groups]) + " |")
    return lines + [""]


def _accuracy_cell(sources):
    def cell(row, group):
        text = plus_minus(row[f"{group}_accuracy"], row[f"{group}_ci95"])
        paper = row[f"{group}_paper_accuracy"]
        if not pd.isna(paper):
            text += f" (paper {paper:.1f} [{sources.index(row[f'{group}_paper_source']) + 1}])"
        return text
    return cell


def _diff_cell(baseline):
    def cell(row, group):
        text = plus_minus(row[f"{group}_diff_vs_{baseline}"], row[f"{group}_diff_vs_{baseline}_ci95"], signed=True)
        above = row[f"{group}_seeds_above_{baseline}"]
        if text and not pd.isna(above):
            text += f" ({int(above)}/{int(row[f'{group}_seeds_paired_with_{baseline}'])})"
        return text
    return cell


def write_ablation(metrics_files: Sequence, episode_files: Sequence, *, csv_out, md_out) -> pd.DataFrame:
    """Load the runs, build the table, write ``ablation.csv`` and ``ablation.md`` atomically."""
    if len(metrics_files) != len(episode_files):
        raise ValueError("every metrics.json needs its episodes.csv (the lists differ in length)")
    long = ablation_long(load_runs(list(zip(metrics_files, episode_files))))
    wide = ablation_wide(long)
    with atomic_path(csv_out) as tmp:
        _rounded(wide).to_csv(tmp, index=False)
    with atomic_path(md_out) as tmp:
        tmp.write_text(ablation_markdown(long, wide))
    log.info("ablation: %d arms x %d dataset/shot columns -> %s, %s", len(wide), len(_groups(wide)), csv_out, md_out)
    return wide


def _rounded(wide: pd.DataFrame) -> pd.DataFrame:
    out = wide.copy()
    for column in out.columns:
        if column.endswith(("_accuracy", "_ci95", "_diff_vs_ft", "_diff_vs_mtl")):
            out[column] = pd.to_numeric(out[column]).round(2)
        elif column.endswith(("_n_seeds", "_seeds_above_ft", "_seeds_above_mtl", "_seeds_paired_with_ft",
                              "_seeds_paired_with_mtl")):
            out[column] = pd.to_numeric(out[column]).astype("Int64")
    return out
