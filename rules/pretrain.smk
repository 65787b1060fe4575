# Pre-train the encoder as a plain classifier over every meta-train class (step 1 of MTL; the
# reference recipe and its settings: docs/reference-implementation.md).


rule pretrain:
    input:
        train="data/{dataset}/train.h5",
        val="data/{dataset}/val.h5",
    output:
        encoder="results/{dataset}/{backbone}/seed{seed}/pretrain/encoder.pt",
        history="results/{dataset}/{backbone}/seed{seed}/pretrain/history.csv",
    log:
        "logs/pretrain/{dataset}/{backbone}/seed{seed}.log",
    benchmark:
        "benchmarks/pretrain/{dataset}/{backbone}/seed{seed}.tsv"
    conda:
        "../envs/mtl.yaml"
    threads: config["threads"] * PRETRAIN_PROCESSES
    resources:
        gpu=PRETRAIN_PROCESSES,
        mem_mb=8000 * PRETRAIN_PROCESSES,
        mpi=PRETRAIN_SLURM.get("mpi"),
        tasks=PRETRAIN_SLURM.get("tasks"),
        tasks_per_gpu=PRETRAIN_SLURM.get("tasks_per_gpu"),
        cpus_per_task=PRETRAIN_SLURM.get("cpus_per_task"),
    params:
        # Resume state lives outside the declared outputs: Snakemake deletes those on failure.
        checkpoint_dir="checkpoints/{dataset}/{backbone}/seed{seed}/pretrain",
        seed=get_training_seed,
        config=config["pretrain"],
        protocol=config["protocol"],
        gpu_job=GPU_JOB,
    script:
        "../workflow_scripts/pretrain.py"


# The untrained encoder of a seed: where the no-pre-training arm (mtl_no_pretrain) starts.
rule random_init:
    output:
        encoder="results/{dataset}/{backbone}/seed{seed}/random_init/encoder.pt",
    log:
        "logs/random_init/{dataset}/{backbone}/seed{seed}.log",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        seed=get_training_seed,
        backbone=config["backbone"],
        config=config["pretrain"],
    script:
        "../workflow_scripts/random_init.py"
