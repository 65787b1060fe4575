"""Rule export_model: one self-contained model file per dataset, method, shot and seed."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.data.hdf5 import HDF5Split
from mtl.model_file import export_model, source_commit
from mtl.results.runs import read_metrics

train, val = HDF5Split(snakemake.input.train), HDF5Split(snakemake.input.val)
export_model(
    snakemake.wildcards.method,
    snakemake.input.model,
    snakemake.output.model,
    trained_on=snakemake.wildcards.dataset,
    seed=snakemake.params.seed,
    shot=int(snakemake.wildcards.shot),
    way=snakemake.params.way,
    data_sha256={"train": train.content_sha256, "val": val.content_sha256},
    stored_image_size=train.image_shape[0],
    config=snakemake.params.settings,
    metrics=read_metrics(snakemake.input.metrics),
    commit=source_commit(snakemake.params.code_dir),
)
