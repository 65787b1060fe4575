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
        # a new random-stream scheme redraws the episodes (a changed param reruns the job), where an
        # old file would otherwise stop every evaluation with "stale episodes"
        stream_version=STREAM_VERSION,
    script:
        "../workflow_scripts/episodes.py"


rule evaluate:
    input:
        test="data/{dataset}/test.h5",
        model=get_evaluated_model,
        episodes=get_episodes_file,
        # the temperature is fitted on validation episodes of the training data (no test label)
        val=get_calibration_split,
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
        calibration_episodes=config["calibration"]["episodes"],
        gpu_job=GPU_JOB,
    script:
        "../workflow_scripts/evaluate.py"


# Transfer: a trained dataset's model (the file its in-domain runs use) scored on another dataset's
# saved test episodes, the same file every source and the target's own runs use, so rows pair.
# Inputs and params follow the wildcards: the model from `trained_on`, the test data and episodes
# from `dataset` (the target); metrics.json records both.
use rule evaluate as evaluate_transfer with:
    output:
        episodes="results/{trained_on}/{backbone}/seed{seed}/{method}/{shot}shot/on_{dataset}/episodes.csv",
        metrics="results/{trained_on}/{backbone}/seed{seed}/{method}/{shot}shot/on_{dataset}/metrics.json",
    log:
        "logs/evaluate/{trained_on}/{backbone}/seed{seed}/{method}/{shot}shot/on_{dataset}.log",
    benchmark:
        "benchmarks/evaluate/{trained_on}/{backbone}/seed{seed}/{method}/{shot}shot/on_{dataset}.tsv"
