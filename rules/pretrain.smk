# Pre-train the encoder as a plain classifier over every meta-train class (REFERENCE.md section 1).


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
    threads: config["threads"]
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        # Resume state lives outside the declared outputs: Snakemake deletes those on failure.
        checkpoint_dir="checkpoints/{dataset}/{backbone}/seed{seed}/pretrain",
        seed=get_training_seed,
        torch_threads=config["threads"],
        backbone=config["backbone"],
        config=config["pretrain"],
        protocol=config["protocol"],
        device=config["device"],
    script:
        "../workflow_scripts/pretrain.py"
