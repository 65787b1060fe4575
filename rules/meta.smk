# Meta-train the scaling/shifting of the frozen encoder (mtl), with the hard-task meta-batch (mtl_ht).


rule meta_train:
    input:
        train="data/{dataset}/train.h5",
        val="data/{dataset}/val.h5",
        encoder=rules.pretrain.output.encoder,
    output:
        model="results/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot/model.pt",
        history="results/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot/history.csv",
    log:
        "logs/meta_train/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot.log",
    benchmark:
        "benchmarks/meta_train/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot.tsv"
    wildcard_constraints:
        method="|".join(META_METHODS),
    conda:
        "../envs/mtl.yaml"
    threads: config["threads"]
    resources:
        gpu=1,
        mem_mb=9000,
    params:
        checkpoint_dir="checkpoints/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot",
        seed=get_training_seed,
        torch_threads=config["threads"],
        config=config["meta"],
        protocol=config["protocol"],
        hard_tasks=is_hard_task_method,
        device=config["device"],
    script:
        "../workflow_scripts/meta_train.py"
