# Fixed test episodes shared by every method, then meta-test on them.


rule episodes:
    input:
        test="data/{dataset}/test.h5",
    output:
        episodes="results/{dataset}/episodes/{way}way{shot}shot.npz",
    log:
        "logs/episodes/{dataset}/{way}way{shot}shot.log",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        protocol=config["protocol"],
    script:
        "../workflow_scripts/episodes.py"


rule evaluate:
    input:
        test="data/{dataset}/test.h5",
        model=get_evaluated_model,
        episodes=get_episodes_file,
    output:
        episodes="results/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot/episodes.csv",
        metrics="results/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot/metrics.json",
    log:
        "logs/evaluate/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot.log",
    benchmark:
        "benchmarks/evaluate/{dataset}/{backbone}/seed{seed}/{method}/{shot}shot.tsv"
    conda:
        "../envs/mtl.yaml"
    threads: config["threads"]
    resources:
        gpu=1,
        mem_mb=6000,
    params:
        protocol=get_run_protocol,
        torch_threads=config["threads"],
        device=config["device"],
    script:
        "../workflow_scripts/evaluate.py"
