"""Rule build_hdf5: decode a dataset's raw files once into data/<dataset>/{train,val,test}.h5."""
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

import logging
from pathlib import Path

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

from mtl.data.prepare import build_splits

build_splits(snakemake.input.manifest, Path(snakemake.output.train).parent, **snakemake.params.options)
