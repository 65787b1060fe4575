"""Rule build_test_hdf5: decode a test-only folder of class folders once into data/<dataset>/test.h5."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from pathlib import Path

from mtl.data.prepare import build_splits

build_splits(snakemake.input.manifest, Path(snakemake.output.test).parent, **snakemake.params.options)
