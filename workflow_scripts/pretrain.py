"""Rule pretrain: train the encoder as a classifier over the meta-train classes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

import torch

from mtl.device import claim_device
from mtl.train.pretrain import PretrainConfig, pretrain

# The configured thread count, not Snakemake's (scaled to --cores): numbers must not depend on --cores.
torch.set_num_threads(snakemake.params.torch_threads)
protocol = snakemake.params.protocol
# Several GPU jobs on one machine each take a different GPU; a scheduler's choice is kept.
with claim_device(snakemake.params.device) as device:
    pretrain(
        snakemake.input.train,
        snakemake.input.val,
        encoder_out=snakemake.output.encoder,
        history_out=snakemake.output.history,
        checkpoint_dir=snakemake.params.checkpoint_dir,
        backbone=dict(snakemake.params.backbone),
        config=PretrainConfig.from_dict(dict(snakemake.params.config)),
        way=protocol["way"],
        query=protocol["query"],
        val_episodes=protocol["val_episodes"],
        seed=snakemake.params.seed,
        device=device,
    )
