"""The summarize step: load the evaluated runs, write the summary tables (:mod:`mtl.results`) and
draw the report's plots (:mod:`mtl.plots`).

It sits above both, so that neither imports the other: the plots read the tables, the tables know
nothing of the plots.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from mtl.plots import plot_accuracies, plot_histories, plot_reliability
from mtl.results.render import verdict_sentences, write_summary
from mtl.results.runs import load_runs
from mtl.results.tables import BASELINE, build_summary, per_seed_table, pooled_reliability

log = logging.getLogger(__name__)


def summarize_runs(
    metrics_files: Sequence,
    episode_files: Sequence,
    history_files: Sequence,
    *,
    csv_out,
    per_seed_csv_out,
    md_out,
    accuracy_plot,
    reliability_plot,
    history_plot,
    rst_out=None,
    baseline: str = BASELINE,
) -> pd.DataFrame:
    """Everything the summarize step writes: the tables (CSV, per-seed CSV, Markdown, RST) and plots."""
    if len(metrics_files) != len(episode_files):
        raise ValueError("every metrics.json needs its episodes.csv (the lists differ in length)")
    runs = load_runs(list(zip(metrics_files, episode_files)))
    summary, per_seed = build_summary(runs, baseline=baseline), per_seed_table(runs, baseline=baseline)
    write_summary(summary, per_seed, csv_path=csv_out, per_seed_csv_path=per_seed_csv_out, md_path=md_out,
                  rst_path=rst_out)
    for sentence in verdict_sentences(summary, baseline):
        log.info("%s", sentence)
    plot_accuracies(summary, per_seed, accuracy_plot)
    plot_reliability(summary, pooled_reliability(runs), reliability_plot)
    plot_histories(history_files, history_plot)
    return summary
