"""Rule evaluate: score one method on the saved test episodes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

import torch

from mtl.batching import inference_batch_size
from mtl.gpu_slots import claim_device
from mtl.evaluate import evaluate

# The configured thread count, not Snakemake's (scaled to --cores): numbers must not depend on --cores.
torch.set_num_threads(snakemake.params.torch_threads)
# Several GPU jobs on one machine each take a different GPU; a scheduler's choice is kept.
with claim_device(snakemake.params.device) as device:
    # measured once per machine and model (a ~2 s probe), then read from the cache
    batch_size = inference_batch_size(snakemake.params.inference_batch, dict(snakemake.params.backbone), device,
                                      cache_dir=snakemake.params.inference_cache)
    evaluate(
        snakemake.wildcards.method,
        snakemake.input.model,
        snakemake.input.test,
        snakemake.input.episodes,
        episodes_out=snakemake.output.episodes,
        metrics_out=snakemake.output.metrics,
        protocol=dict(snakemake.params.protocol),
        batch_size=batch_size,
        device=device,
    )
