"""One worker process of a multi-process run (started by torchrun): joins the process group on
its claimed device, calls the training function, leaves the group."""
from __future__ import annotations

import ctypes
import datetime
import importlib
import inspect
import json
import logging
import os
import signal
import socket

import torch.distributed as dist

log = logging.getLogger(__name__)

# Rank 0 validates while the others wait at a barrier; a slow validation must not time them out.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


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
