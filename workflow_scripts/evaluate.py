"""Rule evaluate: score one method on the saved test episodes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.evaluate import evaluate
from mtl.jobs import open_gpu_job

with open_gpu_job(**snakemake.params.gpu_job) as job:
    evaluate(
        snakemake.wildcards.method,
        snakemake.input.model,
        snakemake.input.test,
        snakemake.input.episodes,
        episodes_out=snakemake.output.episodes,
        metrics_out=snakemake.output.metrics,
        protocol=dict(snakemake.params.protocol),
        val_h5=snakemake.input.val,
        calibration_episodes=snakemake.params.calibration_episodes,
        inference_batch_size=job.inference_batch_size,
        device=job.device,
    )
