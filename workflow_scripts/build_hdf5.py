"""Rule build_hdf5: decode a dataset's raw files once into data/<dataset>/{train,val,test}.h5."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from pathlib import Path

from mtl.data.prepare import build_splits

build_splits(snakemake.input.manifest, Path(snakemake.output.train).parent, **snakemake.params.options)
