"""Rule predict: classify the query folder with the seed ensemble of the chosen method and shot."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

import torch

from mtl.batching import inference_batch_size
from mtl.gpu_slots import claim_device
from mtl.predict import predict_with_trained_models

# The configured thread count, not Snakemake's (scaled to --cores): numbers must not depend on --cores.
torch.set_num_threads(snakemake.params.torch_threads)
with claim_device(snakemake.params.device) as device:
    batch_size = inference_batch_size(snakemake.params.inference_batch, dict(snakemake.params.backbone), device,
                                      cache_dir=snakemake.params.inference_cache)
    predict_with_trained_models(
        list(snakemake.input.models),
        snakemake.input.support,
        snakemake.input.query,
        snakemake.output.csv,
        trained_on=snakemake.params.trained_on,
        method=snakemake.params.method,
        shot=snakemake.params.shot,
        summary_csv=snakemake.input.get("summary"),
        expected_backbone=dict(snakemake.params.backbone),
        batch_size=batch_size,
        device=device,
    )
