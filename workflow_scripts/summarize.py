"""Rule summarize: results/summary.csv, summary.md and the report's plots."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.results import summarize_runs

summarize_runs(
    list(snakemake.input.metrics),
    list(snakemake.input.episodes),
    list(snakemake.input.histories),
    csv_out=snakemake.output.csv,
    md_out=snakemake.output.md,
    accuracy_plot=snakemake.output.accuracy_plot,
    history_plot=snakemake.output.history_plot,
)
