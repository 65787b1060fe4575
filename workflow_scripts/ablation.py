"""Rule ablation: results/ablation.csv and ablation.md, every arm against ft and mtl across seeds."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.ablation import write_ablation

write_ablation(
    list(snakemake.input.metrics),
    list(snakemake.input.episodes),
    csv_out=snakemake.output.csv,
    md_out=snakemake.output.md,
)
