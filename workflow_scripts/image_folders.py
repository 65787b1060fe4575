"""Rule image_folders: test images of a dataset as support/query folders with the query's true classes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from pathlib import Path

from mtl.data.user_images import write_image_folders

write_image_folders(
    snakemake.input.test,
    Path(snakemake.output.truth).parent,
    support_per_class=snakemake.params.support_per_class,
    query_per_class=snakemake.params.query_per_class,
    seed=snakemake.params.seed,
)
