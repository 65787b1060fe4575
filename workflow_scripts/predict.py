"""Rule predict: classify the query folder with the seed ensemble of the chosen method and shot."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.jobs import open_gpu_job
from mtl.predict import predict_with_trained_models

gpu_job = snakemake.params.gpu_job
with open_gpu_job(**gpu_job) as job:
    predict_with_trained_models(
        list(snakemake.input.models),
        snakemake.input.support,
        snakemake.input.query,
        snakemake.output.csv,
        trained_on=snakemake.params.trained_on,
        method=snakemake.params.method,
        shot=snakemake.params.shot,
        summary_csv=snakemake.input.get("summary"),
        expected_backbone=dict(gpu_job["backbone"]),
        inference_batch_size=job.inference_batch_size,
        device=job.device,
        unknown=snakemake.params.unknown,
    )
