"""One training run on several processes (GPUs, or CPU workers): launch, rank helpers, synced BN.

Scale-out uses torch.distributed only. :func:`launch` calls a training function in N worker
processes, each in the default process group (NCCL on GPUs, gloo on the CPU):

- on one machine, through torchrun's elastic agent (``torch.distributed.run``, run in this
  process) with a standalone rendezvous;
- inside a Slurm batch job, through ``srun``: one torchrun agent per node of the allocation, the
  agents meeting at a c10d rendezvous on the job's first node. The same command serves one node
  or many (profiles/slurm/README.md).

With N = 1 none of this happens: the function runs in this process, as it always has.

Each worker dies with its launcher (a killed run leaves no orphans that keep writing), opens its
job like any GPU job (:func:`mtl.jobs.open_gpu_job`: threads, its own device, the inference batch
size measured on it), sends its stdout/stderr to the run's log
with a ``[rank r/N]`` prefix on every logging line, and calls the function. Training code stays
one loop: it asks :func:`rank`, :func:`world_size`, :func:`is_main`, takes its part of each batch
with :func:`shard`, and waits at :func:`barrier` while rank 0 validates and writes.

Example (what workflow_scripts/pretrain.py does)::

    launch(pretrain, {"train_h5": ..., "config": {...}}, processes=2, device="auto", threads=4,
           inference_batch="auto", backbone={"name": "resnet12", "width": 1.0, "image_size": None},
           cache_dir="results/.cache", log_path="logs/pretrain.log")
    # two processes of 4 CPU threads, one GPU each, each with the inference batch size of its GPU
"""
from __future__ import annotations

import ctypes
import datetime
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mtl.errors import ConfigError, MTLError

log = logging.getLogger(__name__)

LAUNCHERS = ("auto", "torchrun", "srun")
# Rank 0 validates while the others wait at a barrier; a slow validation must not time them out.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
_LIBRARY_ROOT = str(Path(__file__).resolve().parent.parent)  # workers import this same `mtl`
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


# ----------------------------------------------------------------------------- rank helpers
def is_distributed() -> bool:
    """True inside a worker of a multi-process run (a process group with more than one member)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that validates, logs per-epoch results and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (``tensor`` itself in one process)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (``flag`` itself in one process).
    ``device``: where this rank's collectives run (a GPU under NCCL)."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def shard(size: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of a batch of ``size`` items: parts differ by at most one item,
    and the parts of ranks 0..N-1 in order are the whole batch (numpy.array_split's rule).

    A part is empty when the batch has fewer items than ranks; the rank still takes part in the
    step's collectives.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(int(size), int(world))
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (rank_ < extra))


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to call in the training loop: ``model`` itself in one process; else ``model``
    with synchronised BatchNorm (converted in place), wrapped in DistributedDataParallel.

    Parameters are shared, not copied: an optimiser built on ``model.parameters()`` afterwards,
    and ``model.state_dict()``, are the same as in one process (BN state keys are unchanged).
    """
    if not is_distributed():
        return model
    sync_batchnorm_(model, device)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


# ----------------------------------------------------------------------------- synchronised BatchNorm
def sync_batchnorm_(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with the statistics of the global batch.

    On GPUs: torch's ``nn.SyncBatchNorm``. Its kernels exist only for CUDA-like devices, so on the
    CPU (gloo; tests, CPU clusters) each ``BatchNorm2d`` becomes :class:`AllReduceBatchNorm2d`,
    the same computation written with all-reduces. Modules are replaced in place; parameters and
    buffers are shared with the originals.
    """
    if device.type == "cuda":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        converted = _convert_batchnorm2d(model)
    if converted is not model:
        raise ValueError("sync_batchnorm_ needs a model whose top module is not itself a BatchNorm")
    return model


def _convert_batchnorm2d(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        converted = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats)
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_batchnorm2d(child))
    return module


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: every rank's loss depends on the sum, so the gradient that
    flows back to each rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the batch summed over all ranks.

    Same mean, biased variance for normalising and unbiased variance for the running estimate as
    ``nn.BatchNorm2d`` on the concatenated batch. One all-reduce per layer and direction carries
    the per-channel sums of x and x^2 (and the count), in float64 so that E[x^2] - E[x]^2 keeps
    float32 accuracy. A rank with an empty part contributes zeros. Outside training, or in one
    process, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims, channels = (0, 2, 3), x.shape[1]
        wide = x.double()
        local = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_full((1,), x.numel() // channels)])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp(min=0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach().to(x.dtype), var.detach().to(x.dtype), count.item())
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        out = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)


# ----------------------------------------------------------------------------- launching
def launch(target: Callable, kwargs: dict, *, processes: int = 1, device: str = "auto",
           threads: int | None = None, inference_batch: int | str | None = None, backbone: dict | None = None,
           cache_dir: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None,
           launcher: str = "auto"):
    """Call ``target(**kwargs, device=<device>)`` in ``processes`` processes; return its result
    (one process) or None (several: read what rank 0 wrote).

    Each process opens its job with :func:`mtl.jobs.open_gpu_job`: it claims one device (one GPU
    each) for the config's ``device`` preference, sets ``threads`` torch CPU threads (None: torch's
    default in one process, 1 in workers) and, given ``inference_batch`` (with ``backbone`` and
    ``cache_dir``, as open_gpu_job takes them), resolves the inference batch size on its own device
    and passes it to ``target`` as ``inference_batch_size`` too. ``log_path``: where workers write (appending,
    rank-prefixed); None leaves their output on this process's stdout/stderr. ``launcher``:
    "torchrun" (this machine), "srun" (inside a Slurm batch job: one torchrun agent per node), or
    "auto": srun inside a Slurm job that is not already within a job step, else torchrun.
    ``target`` must be importable by name and ``kwargs`` JSON-serialisable: workers are new
    processes.
    """
    from mtl.jobs import open_gpu_job

    processes = _check_processes(processes)
    if processes > 1 and ":" in str(device):
        raise ConfigError(f"device: {device} pins one GPU, but {processes} training processes need one GPU each; "
                          "use device: auto or cuda (each process then claims a free GPU), or pretrain.gpus: 1.")
    inference = {"inference_batch": inference_batch, "backbone": None if backbone is None else dict(backbone),
                 "cache_dir": None if cache_dir is None else str(cache_dir)}
    if processes == 1:
        with open_gpu_job(threads=threads, device=device, **inference) as job:
            return target(**kwargs, **job.arguments())
    launcher = choose_launcher(launcher)
    spec = {"target": f"{target.__module__}:{target.__qualname__}", "kwargs": kwargs, "device": device,
            "threads": int(threads or 1), "inference": inference,
            "log": None if log_path is None else str(Path(log_path).resolve())}
    json.dumps(spec)  # fail here, not in N workers, when kwargs cannot travel
    log.info("launching %d workers with %s (%d CPU thread(s) each)", processes, launcher, spec["threads"])
    if launcher == "torchrun":
        _run_torchrun(torchrun_args(processes, spec), spec["log"])
    else:
        _run_srun(processes, spec)
    return None


def _check_processes(processes) -> int:
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"the number of training processes (pretrain.gpus) must be an integer >= 1, "
                          f"got {processes!r}")
    return processes


def choose_launcher(launcher: str = "auto", environ: dict | None = None) -> str:
    """Resolve "auto": srun inside a Slurm batch allocation (``SLURM_JOB_ID`` set, no
    ``SLURM_STEP_ID``: not already inside a job step, whose resources a new step could not get),
    else torchrun on this machine."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
    if launcher != "auto":
        return launcher
    environ = os.environ if environ is None else environ
    in_batch_job = "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" not in environ
    return "srun" if in_batch_job and shutil.which("srun") else "torchrun"


def torchrun_args(processes_per_node: int, spec: dict, *, nodes: int = 1, endpoint: str | None = None,
                  run_id: str | None = None) -> list[str]:
    """torchrun's command line (without ``python -m torch.distributed.run``) for the workers of
    one node: standalone on one machine, or a c10d rendezvous at ``endpoint`` for ``nodes`` nodes."""
    if endpoint is None:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}"]
    return [f"--nnodes={nodes}", f"--nproc-per-node={processes_per_node}", *rendezvous,
            "--max-restarts=0", "-m", "mtl.distributed", "worker", json.dumps(spec)]


def _worker_env() -> dict[str, str]:
    """This environment, with this `mtl` first on PYTHONPATH so workers import the same code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_LIBRARY_ROOT, env.get("PYTHONPATH")]))
    return env


def _run_torchrun(args: list[str], log_file: str | None) -> None:
    """torchrun's agent, in this process: its workers are our children and die with us."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    previous_handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    saved_env = dict(os.environ)
    os.environ.update(_worker_env())
    try:
        run(parse_args(args))
    except ChildFailedError as err:
        raise MTLError(_failure_message(f"torchrun exited: {_first_failure(err)}", log_file)) from None
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in previous_handlers.items():  # the agent installs its own
            signal.signal(sig, handler)


def _first_failure(err) -> str:
    failures = getattr(err, "failures", {}) or {}
    for global_rank, failure in sorted(failures.items()):
        return f"rank {global_rank} failed with exit code {failure.exitcode}"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _failure_message(what: str, log_file: str | None) -> str:
    where = f"the [rank r/N] lines of {log_file}" if log_file else "the workers' output above"
    return f"distributed training failed ({what}); the failing rank's error is in {where}."


def srun_command(processes: int, nodes: int, spec: dict, *, endpoint: str, job_id: str,
                 threads_per_worker: int) -> list[str]:
    """``srun`` starting one torchrun agent per node; each starts processes/nodes workers."""
    per_node = processes // nodes
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={per_node * threads_per_worker}", "--mem=0", "--kill-on-bad-exit=1",
            sys.executable, "-m", "torch.distributed.run",
            *torchrun_args(per_node, spec, nodes=nodes, endpoint=endpoint, run_id=f"slurm-{job_id}")]


def _run_srun(processes: int, spec: dict) -> None:
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise MTLError("launcher srun needs a Slurm job (SLURM_JOB_ID is unset); run inside sbatch/salloc "
                       "or use the torchrun launcher.")
    nodes = allocated_nodes(job_id)
    if processes % nodes:
        raise ConfigError(f"pretrain.gpus = {processes} processes cannot be shared evenly by the {nodes} "
                          f"nodes of Slurm job {job_id}; ask for a node count that divides it "
                          "(resource `nodes` of rule pretrain in profiles/slurm/config.yaml).")
    # This script runs on the allocation's first node: the rendezvous lives here.
    endpoint = f"{socket.gethostname()}:{_free_port()}"
    command = srun_command(processes, nodes, spec, endpoint=endpoint, job_id=job_id,
                           threads_per_worker=spec["threads"])
    log.info("srun command: %s", " ".join(command[:-1] + ["'<spec>'"]))
    log_file = spec["log"]
    with open(log_file, "a") if log_file else open(os.devnull, "w") as sink:
        output = {"stdout": sink, "stderr": subprocess.STDOUT} if log_file else {}
        result = subprocess.run(command, env=_worker_env(), check=False, **output)
    if result.returncode != 0:
        raise MTLError(_failure_message(f"srun exited with code {result.returncode}", log_file))


def allocated_nodes(job_id: str) -> int:
    """Node count of Slurm job ``job_id`` (``scontrol show job``: the executor plugin removes
    SLURM_NNODES from a job's environment)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise MTLError(f"cannot ask Slurm for the nodes of job {job_id} (`scontrol show job`: {err}).") from err
    match = re.search(r"\bNumNodes=(\d+)", out)
    if not match:
        raise MTLError(f"`scontrol show job {job_id}` printed no NumNodes: {out.strip()[:200]!r}")
    return int(match.group(1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- the worker process
def worker_main(spec_json: str) -> None:
    """Entry point of one worker (``python -m mtl.distributed worker SPEC``, started by torchrun)."""
    from mtl.jobs import open_gpu_job
    from mtl.logs import log_worker_to_file

    _die_with_parent()
    spec = json.loads(spec_json)
    global_rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    log_worker_to_file(spec["log"], f"rank {global_rank}/{world}")
    module_name, _, function_name = spec["target"].partition(":")
    target = getattr(importlib.import_module(module_name), function_name)
    with open_gpu_job(threads=spec["threads"], device=spec["device"], **spec.get("inference", {})) as job:
        device = job.device
        backend = "nccl" if device.type == "cuda" else "gloo"
        log.info("worker pid %d on %s: %s, backend %s", os.getpid(), socket.gethostname(), device, backend)
        # Bind NCCL to the claimed GPU where this torch can (its barrier then needs no guess).
        bind = device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **({"device_id": device} if bind else {}))
        try:
            target(**spec["kwargs"], **job.arguments())
        finally:
            dist.destroy_process_group()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the torchrun agent) dies, so a killed
    run never leaves workers that keep training and writing checkpoints."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() == 1:  # the parent died before we asked
        os._exit(1)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        sys.exit("usage: python -m mtl.distributed worker SPEC_JSON (started by torchrun; see "
                 "mtl.distributed.launch)")
    from mtl.distributed import worker_main as _worker_main  # the library module, not __main__

    _worker_main(sys.argv[2])
