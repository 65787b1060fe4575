# Lists derived from config, wildcard constraints and target functions. No training logic here:
# anything that needs a unit test lives in mtl/. What each method trains and starts from is read
# from the method registry (mtl/methods.py).
import os
from pathlib import Path

from mtl import methods as method_registry
from mtl import transfer as transfer_config
from mtl.errors import ConfigError
from mtl.rng import STREAM_VERSION

SPLITS = ["train", "val", "test"]
DATASETS = [name for name, entry in config["data"].items() if entry["enabled"]]
# Transfer evaluation (mtl/transfer.py): test-only folders are only scored; `transfer` maps a
# trained dataset to the datasets its models are also scored on (checked with the whole config,
# mtl/config.py, before any job).
TRANSFER = transfer_config.check_transfer(config)
TEST_ONLY = transfer_config.test_only_datasets(config)
# Datasets that are pre-trained, meta-trained and scored in-domain.
TRAINED = transfer_config.trained_datasets(config)
BACKBONE = config["backbone"]["name"]
METHODS = config["methods"]
# `snakemake ablation` scores every registry entry, whatever `methods` lists.
ABLATION_ARMS = list(method_registry.NAMES)
META_METHODS = method_registry.meta_trained(METHODS)
META_ARMS = method_registry.meta_trained(ABLATION_ARMS)
WAY = config["protocol"]["way"]
SHOTS = config["protocol"]["shots"]
# Where the measured inference batch size is cached per machine, model and image size
# (mtl/batching.py); a disposable record, kept outside every rule's outputs.
INFERENCE_CACHE = "results/.cache"
# How every job that runs torch opens (mtl/jobs.py): the configured thread count, not Snakemake's
# (scaled to --cores), since the numbers must not depend on --cores; a claimed device; the inference
# batch size of the configured backbone on that device.
GPU_JOB = {
    "threads": config["threads"],
    "device": config["device"],
    "inference_batch": config["inference"]["batch_size"],
    "backbone": config["backbone"],
    "cache_dir": INFERENCE_CACHE,
}
# Training seeds: each replicates the whole training chain as its own jobs (a wildcard, not a loop
# in a script), so Snakemake spreads the replicates over cores, GPUs and cluster nodes.
SEEDS = config["protocol"]["seeds"]
# Pre-training processes (one GPU each). With more than one, under profiles/slurm the job itself
# starts them with srun over its allocation: the executor plugin then runs the job script outside
# a job step (`mpi`), asks for one task per process (`tasks`; `tasks_per_gpu: 0` stops the plugin
# reading `tasks` as tasks per GPU) with `threads` CPUs each. None leaves a resource unset.
PRETRAIN_PROCESSES = config["pretrain"]["gpus"]
PRETRAIN_SLURM = (
    {
        "mpi": "srun",
        "tasks": PRETRAIN_PROCESSES,
        "tasks_per_gpu": 0,
        "cpus_per_task": config["threads"],
    }
    if PRETRAIN_PROCESSES > 1
    else {}
)


wildcard_constraints:
    dataset="|".join(DATASETS) or "NO_DATASET_ENABLED",
    # the dataset whose training produced a transfer run's model
    trained_on="|".join(TRAINED) or "NO_TRAINED_DATASET",
    split="|".join(SPLITS),
    backbone=BACKBONE,
    method="|".join(method_registry.NAMES),
    shot=r"\d+",
    way=r"\d+",
    seed=r"\d+",


def dataset_entry(wildcards):
    entry = config["data"][wildcards.dataset]
    # test_only: false is left out, so the download jobs of datasets configured before the key
    # existed keep their recorded params (and do not rerun).
    return {key: value for key, value in entry.items() if key != "test_only" or value}


def test_only_image_size(entry):
    """A test-only folder is stored at its entry's image_size, else at the size the models see
    (backbone.image_size, else the backbone's native size)."""
    size = entry["image_size"] or config["backbone"]["image_size"]
    if size is None:
        from mtl.models.backbone import (
            backbone_class,
        )  # imports torch: only when needed

        size = backbone_class(BACKBONE).native_size
    return int(size)


def dataset_build_options(wildcards):
    """Builder options; a folder of images must hold shot + query images of every class for the
    largest episode (test shots and the pre-training validation shot; a test-only folder, scored
    only, the test shots alone, and at least `way` classes)."""
    entry = config["data"][wildcards.dataset]
    if entry["test_only"]:
        return {
            "strict_counts": entry["strict_counts"],
            "image_size": test_only_image_size(entry),
            "min_images_per_class": max(SHOTS) + config["protocol"]["query"],
            "test_only": True,
            "min_classes": WAY,
        }
    largest_shot = max(SHOTS + [config["pretrain"]["val_shot"]])
    return {
        "strict_counts": entry["strict_counts"],
        "image_size": entry["image_size"],
        "min_images_per_class": largest_shot + config["protocol"]["query"],
    }


def training_wildcards(wildcards):
    """The wildcards of the training chain behind a run: a transfer run's (evaluate_transfer) model
    was trained on `trained_on`, an in-domain run's on `dataset`."""
    values = dict(wildcards.items())
    values["dataset"] = values.pop("trained_on", values["dataset"])
    return values


def get_start_encoder(wildcards):
    """The encoder of this seed the method starts from: pre-trained, or untrained (random_init)."""
    values = training_wildcards(wildcards)
    if method_registry.start_encoder(values["method"]) == method_registry.RANDOM_INIT:
        return rules.random_init.output.encoder.format(**values)
    return rules.pretrain.output.encoder.format(**values)


def get_evaluated_model(wildcards):
    """Meta-trained methods are scored with their model, the others with their start encoder
    (for a transfer run: the model of its trained_on dataset, the very file in-domain runs use).
    """
    values = training_wildcards(wildcards)
    if method_registry.get_method(values["method"]).meta_trained:
        return rules.meta_train.output.model.format(**values)
    return get_start_encoder(wildcards)


def get_calibration_split(wildcards):
    """The validation split of the dataset the run's model was trained on."""
    return "data/{dataset}/val.h5".format(**training_wildcards(wildcards))


def get_training_seed(wildcards):
    return int(wildcards.seed)


def get_episodes_file(wildcards):
    return rules.episodes.output.episodes.format(
        dataset=wildcards.dataset, way=WAY, shot=wildcards.shot
    )


def get_run_protocol(wildcards):
    """What a metrics.json records next to its accuracy, besides what the episode file fixes.

    A transfer run adds `trained_on`; an in-domain run leaves it out (the metrics file then records
    trained_on = dataset), so the params of in-domain jobs are what they were and nothing reruns.
    """
    trained_on = (
        {"trained_on": wildcards.trained_on} if "trained_on" in wildcards.keys() else {}
    )
    return {
        **trained_on,
        "dataset": wildcards.dataset,
        "backbone": BACKBONE,
        "backbone_width": config["backbone"]["width"],
        "method": wildcards.method,
        "seed": int(wildcards.seed),
    }


def _run_files(pattern, methods):
    return expand(
        pattern,
        dataset=TRAINED,
        backbone=BACKBONE,
        seed=SEEDS,
        method=methods,
        shot=SHOTS,
    )


def get_metrics_files(methods=METHODS):
    return _run_files(rules.evaluate.output.metrics, methods)


def get_episode_result_files(methods=METHODS):
    return _run_files(rules.evaluate.output.episodes, methods)


def _transfer_files(pattern, methods):
    """Every method, seed and shot of each trained dataset scored on each of its `transfer` targets."""
    return [
        path
        for trained_on, target in transfer_config.transfer_pairs(TRANSFER)
        for path in expand(
            pattern,
            trained_on=trained_on,
            dataset=target,
            backbone=BACKBONE,
            seed=SEEDS,
            method=methods,
            shot=SHOTS,
        )
    ]


def get_transfer_metrics_files(methods=METHODS):
    return _transfer_files(rules.evaluate_transfer.output.metrics, methods)


def get_transfer_episode_result_files(methods=METHODS):
    return _transfer_files(rules.evaluate_transfer.output.episodes, methods)


def get_history_files():
    pretrain = expand(
        rules.pretrain.output.history, dataset=TRAINED, backbone=BACKBONE, seed=SEEDS
    )
    meta = expand(
        rules.meta_train.output.history,
        dataset=TRAINED,
        backbone=BACKBONE,
        seed=SEEDS,
        method=META_METHODS,
        shot=SHOTS,
    )
    return pretrain + meta


def get_hdf5_targets():
    # a test-only dataset has its test split alone
    return expand("data/{dataset}/{split}.h5", dataset=TRAINED, split=SPLITS) + expand(
        "data/{dataset}/test.h5", dataset=TEST_ONLY
    )


def get_encoder_targets():
    return expand(
        rules.pretrain.output.encoder, dataset=TRAINED, backbone=BACKBONE, seed=SEEDS
    )


def get_final_output():
    return ["results/summary.csv"] + get_exported_models()


# ---------------------------------------------------------------- exported models, prediction
# `predict:` in config.yaml: a support folder of labelled class folders and a query folder.
PREDICT = config["predict"]


def get_model_settings(wildcards):
    """What an exported model records of the config it was trained and is used with."""
    method = method_registry.get_method(wildcards.method)
    settings = {
        "backbone": config["backbone"],
        "protocol": config["protocol"],
        "pretrain": config["pretrain"],
        "data": config["data"][wildcards.dataset],
    }
    if method.meta_trained:
        # config.yaml's `meta` with the arm's fixed settings (second order, meta-batch)
        settings["meta"] = method_registry.meta_settings(method.name, config["meta"])
    return settings


def get_exported_models(datasets=TRAINED, methods=METHODS, shots=SHOTS):
    return expand(
        rules.export_model.output.model,
        dataset=datasets,
        backbone=BACKBONE,
        method=methods,
        shot=shots,
        seed=SEEDS,
    )


def get_predict_dataset(wildcards=None):
    """The trained dataset whose models predict: `predict.trained_on` (checked with the config),
    else the only trained one."""
    if PREDICT["trained_on"] is not None:
        return PREDICT["trained_on"]
    if len(TRAINED) != 1:
        raise ConfigError(
            f"predict.trained_on is null but {len(TRAINED)} datasets are trained ({', '.join(TRAINED)}): "
            "set predict.trained_on to the one whose models predict (config.yaml `predict:`)"
        )
    return TRAINED[0]


def workflow_image_folders():
    """The support and query folders rule image_folders writes (its worked example)."""
    patterns = (rules.image_folders.output.support, rules.image_folders.output.query)
    return {
        os.path.normpath(pattern.format(dataset=dataset))
        for pattern in patterns
        for dataset in DATASETS
    }


def get_folder_contents(folder):
    """Every file and sub-folder in a folder of the user's images (hidden ones aside, as predict
    skips them), so that an image added, removed or replaced reruns predict: the folder's own mtime
    misses changes inside its class folders. Snakemake sees a replaced file by its mtime, an added
    or removed one by the input set and by the mtime of the folder holding it. The folders of the
    worked example (image_folders) are left to their job, which Snakemake dates by its timestamp
    file; their files do not exist before that job runs, and listing them afterwards would change
    predict's inputs and rerun it once for nothing. A missing folder lists nothing: the folder
    itself is an input, which Snakemake reports missing.
    """
    root = Path(folder)
    if os.path.normpath(root) in workflow_image_folders() or not root.is_dir():
        return []
    # imports numpy: only when predict runs
    from mtl.data.builders.imagefolder import is_hidden

    return sorted(
        str(path)
        for path in root.rglob("*")
        if not any(is_hidden(part) for part in path.relative_to(root).parts)
    )


def get_predict_inputs(wildcards):
    """The support and query folders and what they hold; every seed's model of the chosen method
    and shot; left open, all of them and the summary (the script picks the best method for the
    closest shot)."""
    missing = [key for key in ("support", "query") if not PREDICT[key]]
    if missing:
        raise ConfigError(
            f"snakemake predict needs predict.{' and predict.'.join(missing)} in the config: a support "
            "folder of class folders (support/<class>/<images>) and a flat query folder of images, e.g. "
            "--config 'predict={support: my_support, query: my_query}'"
        )
    methods = [PREDICT["method"]] if PREDICT["method"] else METHODS
    shots = [PREDICT["shot"]] if PREDICT["shot"] else SHOTS
    inputs = {
        "support": PREDICT["support"],
        "query": PREDICT["query"],
        "support_contents": get_folder_contents(PREDICT["support"]),
        "query_contents": get_folder_contents(PREDICT["query"]),
        "models": get_exported_models([get_predict_dataset()], methods, shots),
    }
    if not (PREDICT["method"] and PREDICT["shot"]):
        inputs["summary"] = "results/summary.csv"
    return inputs
