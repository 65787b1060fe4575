"""Where tensors live: pick the device once, and mixed precision only where it pays (CUDA).

The pipeline never changes ``CUDA_VISIBLE_DEVICES``; the scheduler (Snakemake, Slurm) or the user
sets it, and we honour what is visible. Which GPU a job takes where several are visible:
:func:`mtl.gpu_slots.claim_device`.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from mtl.errors import ConfigError, MTLError

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "cuda", "cpu")


def select_device(preference: str = "auto") -> torch.device:
    """Turn the config's ``device`` value ("auto", "cuda", "cuda:N" or "cpu") into a torch device.

    "auto" takes the first visible GPU and falls back to the CPU with a warning (training on a CPU
    is slow, so the user should know). "cuda" is a promise: no visible GPU is an error, not a
    silent CPU run that takes days.
    """
    choice = str(preference).strip().lower()
    kind = choice.split(":", 1)[0]
    if kind not in PREFERENCES or (kind != "cuda" and ":" in choice):
        raise ConfigError(
            f"device: {preference!r} is not a valid device; use one of {', '.join(PREFERENCES)} "
            "(or cuda:N for a specific visible GPU)."
        )
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("device: auto found no visible CUDA GPU (%s); running on the CPU, which is slow.",
                    visible_devices_note())
        return torch.device("cpu")
    return _cuda_device(choice)


def _cuda_device(choice: str) -> torch.device:
    """A CUDA device that really exists, or an error that says why it does not."""
    if not torch.cuda.is_available():
        raise MTLError(
            f"device: {choice} was requested but no CUDA GPU is visible ({visible_devices_note()}). "
            "Check the GPU driver and that CUDA_VISIBLE_DEVICES lists a GPU, or set `device: auto` "
            "(falls back to the CPU) or `device: cpu`."
        )
    device = torch.device(choice)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise MTLError(
            f"device: {choice} was requested but only {count} GPU(s) are visible "
            f"({visible_devices_note()}); indices count from 0 among the visible GPUs."
        )
    return device


def visible_devices_note() -> str:
    """How ``CUDA_VISIBLE_DEVICES`` is set, for messages about which GPUs this process sees."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES is unset" if value is None else f"CUDA_VISIBLE_DEVICES={value!r}"


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``: bf16 where the GPU has it, else fp16; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str, enabled: bool = True):
    """Mixed precision on CUDA (bf16, or fp16 on older GPUs); a no-op context on the CPU.

    CPU autocast is slower than fp32 for these convnets and changes results, so it is never used.
    """
    dtype = autocast_dtype(device)
    if dtype is None or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device | str) -> torch.amp.GradScaler:
    """A loss scaler that is active only when autocast uses fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device) == torch.float16)
