"""Rule download: make a dataset's raw files available and write their manifest."""
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

import logging

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

from mtl.data.prepare import fetch_raw

fetch_raw(
    snakemake.wildcards.dataset,
    dict(snakemake.params.entry),
    snakemake.params.raw_dir,
    snakemake.output.manifest,
)
