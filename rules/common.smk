# Lists derived from config, wildcard constraints and target functions. No training logic here:
# anything that needs a unit test lives in mtl/. What each method trains and starts from is read
# from the method registry (mtl/methods.py).
from mtl import methods as method_registry

SPLITS = ["train", "val", "test"]
DATASETS = [name for name, entry in config["data"].items() if entry["enabled"]]
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
# Training seeds: each replicates the whole training chain as its own jobs (DESIGN.md "Seeds").
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
    split="|".join(SPLITS),
    backbone=BACKBONE,
    method="|".join(method_registry.NAMES),
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
    return method_registry.get_method(wildcards.method).meta.hard_tasks


def get_meta_scope(wildcards):
    """Where the method meta-learns scales/shifts: all blocks, or the last one."""
    return method_registry.get_method(wildcards.method).meta.scope


def get_meta_config(wildcards):
    """config.yaml's `meta` block with the arm's fixed settings (second order, meta-batch)."""
    return method_registry.meta_settings(wildcards.method, config["meta"])


def get_start_encoder(wildcards):
    """The encoder of this seed the method starts from: pre-trained, or untrained (random_init)."""
    if method_registry.start_encoder(wildcards.method) == method_registry.RANDOM_INIT:
        return rules.random_init.output.encoder.format(**wildcards)
    return rules.pretrain.output.encoder.format(**wildcards)


def get_evaluated_model(wildcards):
    """Meta-trained methods are scored with their model, the others with their start encoder."""
    if method_registry.get_method(wildcards.method).meta_trained:
        return rules.meta_train.output.model.format(**wildcards)
    return get_start_encoder(wildcards)


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


def _run_files(pattern, methods):
    return expand(
        pattern,
        dataset=DATASETS,
        backbone=BACKBONE,
        seed=SEEDS,
        method=methods,
        shot=SHOTS,
    )


def get_metrics_files(methods=METHODS):
    return _run_files(rules.evaluate.output.metrics, methods)


def get_episode_result_files(methods=METHODS):
    return _run_files(rules.evaluate.output.episodes, methods)


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
        settings["meta"] = get_meta_config(wildcards)
    return settings


def get_exported_models(datasets=DATASETS, methods=METHODS, shots=SHOTS):
    return expand(
        rules.export_model.output.model,
        dataset=datasets,
        backbone=BACKBONE,
        method=methods,
        shot=shots,
        seed=SEEDS,
    )


def get_predict_dataset(wildcards=None):
    """The trained dataset whose models predict: `predict.trained_on`, else the only one enabled."""
    name = PREDICT["trained_on"]
    if name is None and len(DATASETS) == 1:
        return DATASETS[0]
    if name not in DATASETS:
        raise ValueError(
            f"predict.trained_on is {name!r}; set it to one of the trained datasets {DATASETS} "
            "(config.yaml `predict:`)"
        )
    return name


def get_predict_inputs(wildcards):
    """Every seed's model of the chosen method and shot; left open, all of them and the summary
    (the script picks the best method for the closest shot)."""
    missing = [key for key in ("support", "query") if not PREDICT[key]]
    if missing:
        raise ValueError(
            f"snakemake predict needs predict.{' and predict.'.join(missing)} in the config: a support "
            "folder of class folders (support/<class>/<images>) and a flat query folder of images, e.g. "
            "--config 'predict={support: my_support, query: my_query}'"
        )
    methods = [PREDICT["method"]] if PREDICT["method"] else METHODS
    shots = [PREDICT["shot"]] if PREDICT["shot"] else SHOTS
    inputs = {
        "support": PREDICT["support"],
        "query": PREDICT["query"],
        "models": get_exported_models([get_predict_dataset()], methods, shots),
    }
    if not (PREDICT["method"] and PREDICT["shot"]):
        inputs["summary"] = "results/summary.csv"
    return inputs
