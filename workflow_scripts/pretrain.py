"""Rule pretrain: train the encoder as a classifier over the meta-train classes."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.distributed.launch import launch
from mtl.tracking import require_tensorboard
from mtl.train.pretrain import PretrainConfig, pretrain

config = PretrainConfig.from_dict(dict(snakemake.params.config))
protocol = snakemake.params.protocol
# TensorBoard curves (config `tracking`), outside the rule's outputs and checkpoints so that
# Snakemake never locks or deletes them: they grow while the job runs and outlive a failed one.
# Read from the config rather than a rule param: params are rerun triggers, and switching tracking
# on must not rerun finished jobs.
tensorboard_dir = None
if snakemake.config["tracking"]["tensorboard"]:
    require_tensorboard()  # now, not in each training process
    w = snakemake.wildcards
    tensorboard_dir = f"tensorboard/{w.dataset}/{w.backbone}/seed{w.seed}/pretrain"
# config.gpus processes (torchrun here, srun in a Slurm job), each opening its own job (threads,
# device, inference batch size: mtl/jobs.py); one process runs here.
gpu_job = dict(snakemake.params.gpu_job)
launch(
    pretrain,
    {
        "train_h5": snakemake.input.train,
        "val_h5": snakemake.input.val,
        "encoder_out": snakemake.output.encoder,
        "history_out": snakemake.output.history,
        "checkpoint_dir": snakemake.params.checkpoint_dir,
        "backbone": dict(gpu_job["backbone"]),
        "config": config.to_dict(),
        "way": protocol["way"],
        "query": protocol["query"],
        "val_episodes": protocol["val_episodes"],
        "seed": snakemake.params.seed,
        "tensorboard_dir": tensorboard_dir,
    },
    processes=config.gpus,
    log_path=snakemake.log[0],
    **gpu_job,
)
