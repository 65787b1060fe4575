"""Rule evaluate: score one method on the saved test episodes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

import torch

from mtl.device import claim_device
from mtl.evaluate import evaluate

# The configured thread count, not Snakemake's (scaled to --cores): numbers must not depend on --cores.
torch.set_num_threads(snakemake.params.torch_threads)
# Several GPU jobs on one machine each take a different GPU; a scheduler's choice is kept.
with claim_device(snakemake.params.device) as device:
    evaluate(
        snakemake.wildcards.method,
        snakemake.input.model,
        snakemake.input.test,
        snakemake.input.episodes,
        episodes_out=snakemake.output.episodes,
        metrics_out=snakemake.output.metrics,
        protocol=dict(snakemake.params.protocol),
        device=device,
    )
