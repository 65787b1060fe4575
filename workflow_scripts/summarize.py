"""Rule summarize: results/summary.csv (across seeds), the per-seed table, summary.md/.rst and the plots."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.report import summarize_runs

summarize_runs(
    list(snakemake.input.metrics),
    list(snakemake.input.episodes),
    list(snakemake.input.histories),
    csv_out=snakemake.output.csv,
    per_seed_csv_out=snakemake.output.per_seed_csv,
    md_out=snakemake.output.md,
    rst_out=snakemake.output.rst,
    accuracy_plot=snakemake.output.accuracy_plot,
    reliability_plot=snakemake.output.reliability_plot,
    history_plot=snakemake.output.history_plot,
)
