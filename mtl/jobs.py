"""The opening every job that runs torch goes through: threads, device, inference batch size.

Each GPU job (pre-training, meta-training, evaluation, prediction) starts the same way, and the
order matters:

1. torch's CPU threads are set to the configured count, not the scheduler's: the thread count can
   change float rounding, so the numbers must not depend on how many cores a job was given;
2. a device is claimed (:func:`mtl.device.claim_device`): several GPU jobs on one machine each
   take a different GPU, and a scheduler's choice is kept;
3. the inference batch size (images per forward pass of every pass that embeds without
   gradients) is resolved on that device (:func:`mtl.batching.inference_batch_size`): a fixed
   integer, or ``auto``, measured once per machine, thread count and model and then read from the
   cache. It needs the claimed device and the thread count, hence last.

::

    with open_gpu_job(threads=4, device="auto", inference_batch="auto",
                      backbone={"name": "resnet12", "width": 1.0, "image_size": None},
                      cache_dir="results/.cache") as job:
        evaluate(..., device=job.device, inference_batch_size=job.inference_batch_size)

A multi-process pre-training run opens one job per process (:func:`mtl.distributed.launch`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from mtl.batching import inference_batch_size, parse_setting
from mtl.gpu_slots import claim_device
from mtl.errors import ConfigError


@dataclass(frozen=True)
class GpuJob:
    """What an opened job runs with."""

    device: torch.device
    #: images per forward pass of inference passes; None when the job was opened without a setting
    inference_batch_size: int | None = None

    def arguments(self) -> dict:
        """``device`` and, when resolved, ``inference_batch_size``: the keyword arguments a job's
        entry point (``pretrain``, ``meta_train``, ``evaluate``) takes them as."""
        resolved = {} if self.inference_batch_size is None else {"inference_batch_size": self.inference_batch_size}
        return {"device": self.device, **resolved}


@contextlib.contextmanager
def open_gpu_job(*, threads: int | None = None, device: str = "auto", inference_batch: int | str | None = None,
                 backbone: Mapping | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Iterator[GpuJob]:
    """Set the threads, claim the device (held until the block ends), resolve the inference batch size.

    ``threads``: torch CPU threads (None: torch's default). ``device``: the config's ``device``
    (auto, cuda, cpu, or cuda:N). ``inference_batch``: the config's ``inference.batch_size``, "auto"
    or an integer; None for a job without inference passes. ``backbone``: the config's
    ``backbone`` ({name, width, image_size}), the model "auto" measures. ``cache_dir``: folder of
    the measurement cache (None: measure every time; ``$MTL_INFERENCE_CACHE`` replaces it).
    """
    if inference_batch is not None and backbone is None and parse_setting(inference_batch) is None:
        raise ConfigError("inference.batch_size auto measures the model it embeds with: open_gpu_job needs the "
                          "backbone ({name, width, image_size})")
    if threads:
        torch.set_num_threads(int(threads))
    with claim_device(device) as claimed:
        size = None
        if inference_batch is not None:
            size = inference_batch_size(inference_batch, dict(backbone or {}), claimed, cache_dir=cache_dir)
        yield GpuJob(claimed, size)
