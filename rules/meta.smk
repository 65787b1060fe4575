# Meta-train the scaling/shifting of the frozen encoder: mtl, mtl_ht and the mtl_* ablation arms
# (mtl/methods.py says what each one trains and which encoder it starts from).


rule meta_train:
    input:
        train="data/{dataset}/train.h5",
        val="data/{dataset}/val.h5",
        encoder=get_start_encoder,
    output:
        model="results/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot/model.pt",
        history="results/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot/history.csv",
    log:
        "logs/meta_train/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot.log",
    benchmark:
        "benchmarks/meta_train/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot.tsv"
    wildcard_constraints:
        method="|".join(META_ARMS),
    conda:
        "../envs/mtl.yaml"
    threads: config["threads"]
    resources:
        gpu=1,
        mem_mb=9000,
    params:
        checkpoint_dir="checkpoints/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot",
        seed=get_training_seed,
        # meta_train applies the method's arm (scope, hard tasks, fixed keys: mtl/methods.py)
        config=config["meta"],
        protocol=config["protocol"],
        gpu_job=GPU_JOB,
    script:
        "../workflow_scripts/meta_train.py"
