"""Rule meta_train: learn the scaling/shifting of the frozen encoder for one dataset, shot, seed and method."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.jobs import open_gpu_job
from mtl.tracking import require_tensorboard
from mtl.train.meta import meta_train

protocol = snakemake.params.protocol
w = snakemake.wildcards
# TensorBoard curves (config `tracking`): outside the rule's outputs and checkpoints, and read from
# the config rather than a rule param, for the reasons given in workflow_scripts/pretrain.py.
tensorboard_dir = None
if snakemake.config["tracking"]["tensorboard"]:
    require_tensorboard()
    tensorboard_dir = f"tensorboard/{w.dataset}/{w.backbone}/seed{w.seed}/{w.method}/{w.shot}shot/meta"
with open_gpu_job(**snakemake.params.gpu_job) as job:
    meta_train(
        snakemake.input.train,
        snakemake.input.val,
        snakemake.input.encoder,
        method=w.method,
        model_out=snakemake.output.model,
        history_out=snakemake.output.history,
        checkpoint_dir=snakemake.params.checkpoint_dir,
        config=dict(snakemake.params.config),
        way=protocol["way"],
        shot=int(w.shot),
        query=protocol["query"],
        val_episodes=protocol["val_episodes"],
        seed=snakemake.params.seed,
        device=job.device,
        inference_batch_size=job.inference_batch_size,
        tensorboard_dir=tensorboard_dir,
    )
