"""Starting a training run's worker processes: in this process (N = 1), through torchrun on this
machine, or through srun with one torchrun agent per node inside a Slurm batch job."""
from __future__ import annotations

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


from mtl.errors import ConfigError, MTLError

log = logging.getLogger(__name__)

LAUNCHERS = ("auto", "torchrun", "srun")
_LIBRARY_ROOT = str(Path(__file__).resolve().parents[2])  # workers import this same `mtl`
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


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
