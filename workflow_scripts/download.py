"""Rule download: make a dataset's raw files available and write their manifest."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.data.prepare import fetch_raw

fetch_raw(
    snakemake.wildcards.dataset,
    dict(snakemake.params.entry),
    snakemake.params.raw_dir,
    snakemake.output.manifest,
)
