# Raw files -> HDF5 splits (the file contract: docs/data-format.md).


# Compute nodes often have no internet: downloads always run where Snakemake runs.
# The manifest is the only declared output, so .part files beside it survive a failure and resume.
rule download:
    output:
        manifest="data/raw/{dataset}/manifest.json",
    log:
        "logs/download/{dataset}.log",
    localrule: True
    conda:
        "../envs/mtl.yaml"
    params:
        entry=dataset_entry,
        raw_dir=subpath(output.manifest, parent=True),
    script:
        "../workflow_scripts/download.py"


rule build_hdf5:
    input:
        manifest=rules.download.output.manifest,
    output:
        train="data/{dataset}/train.h5",
        val="data/{dataset}/val.h5",
        test="data/{dataset}/test.h5",
    log:
        "logs/build_hdf5/{dataset}.log",
    benchmark:
        "benchmarks/build_hdf5/{dataset}.tsv"
    wildcard_constraints:
        dataset="|".join(TRAINED) or "NO_TRAINED_DATASET",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=3000,
    params:
        options=dataset_build_options,
    script:
        "../workflow_scripts/build_hdf5.py"


# A test-only dataset (data.<name>.test_only, a transfer target): its folder of class folders
# becomes data/<name>/test.h5 alone. Not `use rule build_hdf5 ... with:`, whose variant would have
# to keep build_hdf5's script: that script finds the folder from output.train, and editing it would
# make Snakemake rerun (code trigger: script newer than outputs) every existing build_hdf5 job and
# hence the whole training chain of every existing results folder.
rule build_test_hdf5:
    input:
        manifest=rules.download.output.manifest,
    output:
        test="data/{dataset}/test.h5",
    log:
        "logs/build_hdf5/{dataset}.log",
    benchmark:
        "benchmarks/build_hdf5/{dataset}.tsv"
    wildcard_constraints:
        dataset="|".join(TEST_ONLY) or "NO_TEST_ONLY_DATASET",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=3000,
    params:
        options=dataset_build_options,
    script:
        "../workflow_scripts/build_test_hdf5.py"
