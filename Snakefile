# Meta-Transfer Learning (Sun et al., CVPR 2019): download -> HDF5 -> pre-train -> meta-train
# -> fixed test episodes -> evaluate -> results/summary.csv. See README.md and config.yaml.
import os

from snakemake.utils import min_version

from mtl.config import check_config

min_version("8.20")


configfile: "config.yaml"


# Every key and value checked against mtl/config.schema.yaml, its defaults filled in, and what the
# schema cannot say (an enabled dataset, its folder, predict's choices among the trained ones),
# before any job: a mistake stops here, a short line each (mtl/config.py). A dataset whose raw
# files are fetched already (rule download's manifest) no longer needs its `path` folder.
check_config(config, fetched_manifest="data/raw/{dataset}/manifest.json")


# The report's front page: the summary table and verdicts of the finished run.
report: "rules/report/workflow.rst"


# --resources gpu=N counts GPUs per machine: on a cluster each node has its own.
resource_scopes:
    gpu="local",


# The scripts import the `mtl` library from this repository whether or not it is installed
# (conda environments of --sdm conda, cluster jobs): jobs inherit this environment.
# (We set the variable, we do not require it from the user, so no `envvars:` entry.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")])
    )
)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/meta.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/predict.smk"


rule all:
    default_target: True
    input:
        get_final_output(),


# Partial targets: every dataset's HDF5 splits; every pre-trained encoder.
rule all_hdf5:
    input:
        get_hdf5_targets(),


rule all_encoders:
    input:
        get_encoder_targets(),
