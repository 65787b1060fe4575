# results/summary.csv: what users read (across training seeds), plus the per-seed table, the
# verdicts and calibration (summary.md), the report's front page (summary.rst, included by
# report/workflow.rst) and the plots.


rule summarize:
    input:
        # in-domain runs, then the transfer runs (trained on one dataset, tested on another)
        metrics=get_metrics_files() + get_transfer_metrics_files(),
        episodes=get_episode_result_files() + get_transfer_episode_result_files(),
        histories=get_history_files(),
    output:
        csv="results/summary.csv",
        per_seed_csv="results/summary_per_seed.csv",
        md="results/summary.md",
        rst="results/summary.rst",
        accuracy_plot=report(
            "results/plots/accuracy.png",
            caption="report/accuracy.rst",
            category="Accuracy",
        ),
        # the reliability tables come from each run's metrics.json (no per-query file)
        reliability_plot=report(
            "results/plots/reliability.png",
            caption="report/reliability.rst",
            category="Calibration",
        ),
        history_plot=report(
            "results/plots/training.png",
            caption="report/training.rst",
            category="Training",
        ),
    log:
        "logs/summarize/summarize.log",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../workflow_scripts/summarize.py"


# `snakemake ablation`: every arm of the method registry (whatever `methods` lists) for every
# dataset, shot and seed, as one table against ft and mtl (mtl/ablation.py).
rule ablation:
    input:
        metrics=get_metrics_files(ABLATION_ARMS),
        episodes=get_episode_result_files(ABLATION_ARMS),
    output:
        csv="results/ablation.csv",
        md="results/ablation.md",
    log:
        "logs/ablation/ablation.log",
    conda:
        "../envs/mtl.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../workflow_scripts/ablation.py"
