# Lists derived from config, wildcard constraints and target functions. No training logic here:
# anything that needs a unit test lives in mtl/.

SPLITS = ["train", "val", "test"]
DATASETS = [name for name, entry in config["data"].items() if entry["enabled"]]


wildcard_constraints:
    dataset="|".join(DATASETS) or "NO_DATASET_ENABLED",
    split="|".join(SPLITS),


def dataset_entry(wildcards):
    return config["data"][wildcards.dataset]


def dataset_build_options(wildcards):
    entry = config["data"][wildcards.dataset]
    return {"strict_counts": entry["strict_counts"], "image_size": entry["image_size"]}


def get_hdf5_targets():
    return expand("data/{dataset}/{split}.h5", dataset=DATASETS, split=SPLITS)


def get_final_output():
    return get_hdf5_targets()
