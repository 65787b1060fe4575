"""Rule pretrain: train the encoder as a classifier over the meta-train classes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.distributed import launch
from mtl.train.pretrain import PretrainConfig, pretrain

config = PretrainConfig.from_dict(dict(snakemake.params.config))
protocol = snakemake.params.protocol
# config.gpus processes (torchrun here, srun in a Slurm job), each claiming its own device; one
# process runs here. The thread count is the configured one, not Snakemake's (scaled to --cores):
# numbers must not depend on --cores. The inference batch is probed on the claimed device (cached).
launch(
    pretrain,
    {
        "train_h5": snakemake.input.train,
        "val_h5": snakemake.input.val,
        "encoder_out": snakemake.output.encoder,
        "history_out": snakemake.output.history,
        "checkpoint_dir": snakemake.params.checkpoint_dir,
        "backbone": dict(snakemake.params.backbone),
        "config": config.to_dict(),
        "way": protocol["way"],
        "query": protocol["query"],
        "val_episodes": protocol["val_episodes"],
        "seed": snakemake.params.seed,
        "inference_batch": snakemake.params.inference_batch,
        "inference_cache": snakemake.params.inference_cache,
    },
    processes=config.gpus,
    device=snakemake.params.device,
    threads=snakemake.params.torch_threads,
    log_path=snakemake.log[0],
)
