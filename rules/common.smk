# Lists derived from config, wildcard constraints and target functions. No training logic here:
# anything that needs a unit test lives in mtl/.

SPLITS = ["train", "val", "test"]
DATASETS = [name for name, entry in config["data"].items() if entry["enabled"]]
BACKBONE = config["backbone"]["name"]
METHODS = config["methods"]
META_METHODS = [m for m in ["mtl", "mtl_ht"] if m in METHODS]
WAY = config["protocol"]["way"]
SHOTS = config["protocol"]["shots"]
# Training seeds: each replicates the whole training chain as its own jobs (DESIGN.md "Seeds").
SEEDS = config["protocol"]["seeds"]


wildcard_constraints:
    dataset="|".join(DATASETS) or "NO_DATASET_ENABLED",
    split="|".join(SPLITS),
    backbone=BACKBONE,
    method="|".join(METHODS),
    shot=r"\d+",
    way=r"\d+",
    seed=r"\d+",


def dataset_entry(wildcards):
    return config["data"][wildcards.dataset]


def dataset_build_options(wildcards):
    """Builder options; a folder of images must hold shot + query images of every class for the
    largest episode (test shots and the pre-training validation shot)."""
    entry = config["data"][wildcards.dataset]
    largest_shot = max(SHOTS + [config["pretrain"]["val_shot"]])
    return {
        "strict_counts": entry["strict_counts"],
        "image_size": entry["image_size"],
        "min_images_per_class": largest_shot + config["protocol"]["query"],
    }


def is_hard_task_method(wildcards):
    return wildcards.method == "mtl_ht"


def get_evaluated_model(wildcards):
    """Meta-trained methods are scored with their model, the baselines with the pre-trained encoder."""
    if wildcards.method in META_METHODS:
        return rules.meta_train.output.model.format(**wildcards)
    return rules.pretrain.output.encoder.format(**wildcards)


def get_training_seed(wildcards):
    return int(wildcards.seed)


def get_episodes_file(wildcards):
    return rules.episodes.output.episodes.format(
        dataset=wildcards.dataset, way=WAY, shot=wildcards.shot
    )


def get_run_protocol(wildcards):
    """What a metrics.json records next to its accuracy, besides what the episode file fixes."""
    return {
        "dataset": wildcards.dataset,
        "backbone": BACKBONE,
        "backbone_width": config["backbone"]["width"],
        "method": wildcards.method,
        "seed": int(wildcards.seed),
    }


def _run_files(pattern):
    return expand(
        pattern,
        dataset=DATASETS,
        backbone=BACKBONE,
        seed=SEEDS,
        method=METHODS,
        shot=SHOTS,
    )


def get_metrics_files():
    return _run_files(rules.evaluate.output.metrics)


def get_episode_result_files():
    return _run_files(rules.evaluate.output.episodes)


def get_history_files():
    pretrain = expand(
        rules.pretrain.output.history, dataset=DATASETS, backbone=BACKBONE, seed=SEEDS
    )
    meta = expand(
        rules.meta_train.output.history,
        dataset=DATASETS,
        backbone=BACKBONE,
        seed=SEEDS,
        method=META_METHODS,
        shot=SHOTS,
    )
    return pretrain + meta


def get_hdf5_targets():
    return expand("data/{dataset}/{split}.h5", dataset=DATASETS, split=SPLITS)


def get_encoder_targets():
    return expand(
        rules.pretrain.output.encoder, dataset=DATASETS, backbone=BACKBONE, seed=SEEDS
    )


def get_final_output():
    return ["results/summary.csv"]
