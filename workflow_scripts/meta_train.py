"""Rule meta_train: learn the scaling/shifting of the frozen encoder for one dataset, shot, seed and method."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

import torch

from mtl.batching import inference_batch_size
from mtl.gpu_slots import claim_device
from mtl.tracking import require_tensorboard
from mtl.train.meta import MetaConfig, meta_train

# The configured thread count, not Snakemake's (scaled to --cores): numbers must not depend on --cores.
torch.set_num_threads(snakemake.params.torch_threads)
protocol = snakemake.params.protocol
w = snakemake.wildcards
# TensorBoard curves (config `tracking`): outside the rule's outputs and checkpoints, and read from
# the config rather than a rule param, for the reasons given in workflow_scripts/pretrain.py.
tensorboard_dir = None
if snakemake.config["tracking"]["tensorboard"]:
    require_tensorboard()
    tensorboard_dir = f"tensorboard/{w.dataset}/{w.backbone}/seed{w.seed}/{w.method}/{w.shot}shot/meta"
# Several GPU jobs on one machine each take a different GPU; a scheduler's choice is kept.
with claim_device(snakemake.params.device) as device:
    # measured once per machine and model (a ~2 s probe), then read from the cache
    batch_size = inference_batch_size(snakemake.params.inference_batch, dict(snakemake.params.backbone), device,
                                      cache_dir=snakemake.params.inference_cache)
    meta_train(
        snakemake.input.train,
        snakemake.input.val,
        snakemake.input.encoder,
        model_out=snakemake.output.model,
        history_out=snakemake.output.history,
        checkpoint_dir=snakemake.params.checkpoint_dir,
        config=MetaConfig.from_dict(dict(snakemake.params.config)),
        way=protocol["way"],
        shot=int(snakemake.wildcards.shot),
        query=protocol["query"],
        val_episodes=protocol["val_episodes"],
        seed=snakemake.params.seed,
        hard_tasks=snakemake.params.hard_tasks,
        scope=snakemake.params.scope,
        method=snakemake.wildcards.method,
        device=device,
        inference_batch_size=batch_size,
        tensorboard_dir=tensorboard_dir,
    )
