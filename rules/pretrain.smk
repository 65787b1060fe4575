# Pre-train the encoder as a plain classifier over every meta-train class (REFERENCE.md section 1).


rule pretrain:
    input:
        train="data/{dataset}/train.h5",
        val="data/{dataset}/val.h5",
    output:
        encoder="results/{dataset}/{backbone}/pretrain/encoder.pt",
        history="results/{dataset}/{backbone}/pretrain/history.csv",
    log:
        "logs/pretrain/{dataset}/{backbone}.log",
    benchmark:
        "benchmarks/pretrain/{dataset}/{backbone}.tsv"
    conda:
        "../envs/mtl.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        # Resume state lives outside the declared outputs: Snakemake deletes those on failure.
        checkpoint_dir="checkpoints/{dataset}/{backbone}/pretrain",
        backbone=config["backbone"],
        config=config["pretrain"],
        protocol=config["protocol"],
        device=config["device"],
        inference_batch=config["inference"]["batch_size"],
        inference_cache=INFERENCE_CACHE,
    script:
        "../workflow_scripts/pretrain.py"
