"""Rule random_init: the untrained encoder of a training seed (start of the no-pre-training arm)."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.train.pretrain import PretrainConfig, random_encoder

random_encoder(
    snakemake.output.encoder,
    backbone=dict(snakemake.params.backbone),
    config=PretrainConfig.from_dict(dict(snakemake.params.config)),
    seed=snakemake.params.seed,
)
