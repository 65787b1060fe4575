"""Rule evaluate: score one method on the saved test episodes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

import torch

from mtl.evaluate import evaluate

torch.set_num_threads(snakemake.threads)
evaluate(
    snakemake.wildcards.method,
    snakemake.input.model,
    snakemake.input.test,
    snakemake.input.episodes,
    episodes_out=snakemake.output.episodes,
    metrics_out=snakemake.output.metrics,
    protocol=dict(snakemake.params.protocol),
    device=snakemake.params.device,
)
