# Trained models leave the workflow: one self-contained file per dataset, method, shot and seed
# (mtl/model_file.py), and `snakemake predict`, which classifies your own images with them
# (mtl/predict.py; config.yaml `predict:`).


rule export_model:
    input:
        model=get_evaluated_model,
        # the run's in-domain scores: the temperature the model predicts with, its test accuracy
        metrics=rules.evaluate.output.metrics,
        train="data/{dataset}/train.h5",
        val="data/{dataset}/val.h5",
    output:
        model="results/models/{dataset}/{backbone}/{method}/{shot}shot/seed{seed}.pt",
    log:
        "logs/export_model/{dataset}/{backbone}/{method}/{shot}shot/seed{seed}.log",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        seed=get_training_seed,
        way=WAY,
        settings=get_model_settings,
        code_dir=workflow.basedir,
    script:
        "../workflow_scripts/export_model.py"


rule predict:
    input:
        unpack(get_predict_inputs),
    output:
        csv=f"results/predictions/{PREDICT['name']}.csv",
    log:
        f"logs/predict/{PREDICT['name']}.log",
    conda:
        "../envs/mtl.yaml"
    threads: config["threads"]
    resources:
        gpu=1,
        mem_mb=6000,
    params:
        trained_on=get_predict_dataset,
        method=PREDICT["method"],
        shot=PREDICT["shot"],
        unknown=PREDICT["unknown"],
        gpu_job=GPU_JOB,
    script:
        "../workflow_scripts/predict.py"


# A worked example with known labels: test images of a dataset written out as a support folder
# (5 per class) and a query folder (30 per class, shuffled), with the query's true classes
# (configs/predict_demo.yaml points `predict:` at them).
rule image_folders:
    input:
        test="data/{dataset}/test.h5",
    output:
        support=directory("results/image_folders/{dataset}/support"),
        query=directory("results/image_folders/{dataset}/query"),
        truth="results/image_folders/{dataset}/query_truth.csv",
    log:
        "logs/image_folders/{dataset}.log",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        support_per_class=5,
        query_per_class=30,
        seed=config["protocol"]["episode_seed"],
    script:
        "../workflow_scripts/image_folders.py"
