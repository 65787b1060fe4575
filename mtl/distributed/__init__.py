"""One training run on several processes (GPUs, or CPU workers).

Scale-out uses torch.distributed only. :func:`mtl.distributed.launch.launch` calls a training
function in N worker processes, each in the default process group (NCCL on GPUs, gloo on the CPU):

- on one machine, through torchrun's elastic agent (``torch.distributed.run``, run in this
  process) with a standalone rendezvous;
- inside a Slurm batch job, through ``srun``: one torchrun agent per node of the allocation, the
  agents meeting at a c10d rendezvous on the job's first node. The same command serves one node
  or many (profiles/slurm/README.md).

With N = 1 none of this happens: the function runs in this process, as it always has.

Each worker (:mod:`mtl.distributed.worker`, ``python -m mtl.distributed worker SPEC``) dies with
its launcher (a killed run leaves no orphans that keep writing), opens its job like any GPU
job (:func:`mtl.jobs.open_gpu_job`: threads, its own device, the inference
batch size measured on it), sends its stdout/stderr to the run's log with a
``[rank r/N]`` prefix on every logging line, and calls the function. Training code stays one
loop: it asks :mod:`mtl.distributed.ranks` for its rank, the world size and whether it is the
main process, takes its part of each batch with ``shard``, waits at ``barrier`` while rank 0
validates and writes, and trains the module :func:`mtl.distributed.sync_bn.wrap_for_training`
returns (synchronised BatchNorm and DDP in a process group).

Modules: ``ranks`` (rank helpers and collectives), ``sync_bn`` (synchronised BatchNorm, the DDP
wrapper), ``launch`` (starting the workers), ``worker`` (one worker process). This package
re-exports nothing: ``mtl.distributed.launch`` names the module, not the function.

Example (what workflow_scripts/pretrain.py does)::

    from mtl.distributed.launch import launch

    launch(pretrain, {"train_h5": ..., "config": {...}}, processes=2, device="auto", threads=4,
           inference_batch="auto", backbone={"name": "resnet12", "width": 1.0, "image_size": None},
           cache_dir="results/.cache", log_path="logs/pretrain.log")
    # two processes of 4 CPU threads, one GPU each, each with the inference batch size of its GPU
"""
