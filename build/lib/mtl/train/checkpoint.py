"""Resume state: atomic checkpoints that load with ``torch.load(weights_only=True)``.

Checkpoints live outside a rule's declared outputs (Snakemake deletes those when a job fails),
are replaced atomically (a kill mid-write leaves the previous one), and hold only tensors and
plain Python values, so loading never runs pickled code.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from mtl.errors import CheckpointError
from mtl.io import atomic_torch_save

log = logging.getLogger(__name__)


def save_checkpoint(path: str | os.PathLike, state: dict | None = None, **fields) -> Path:
    """Write ``state`` (and/or keyword fields) to ``path`` atomically."""
    return atomic_torch_save({**(state or {}), **fields}, path)


def load_checkpoint(path: str | os.PathLike, producer: str = "the training step") -> dict | None:
    """The checkpoint at ``path``, or None when there is none (a fresh start).

    ``producer`` names what writes it (e.g. "the `pretrain` rule"), for the error a corrupt one raises.
    """
    path = Path(path)
    if not path.exists():
        return None
    fix = (f"It is the resume state of {producer}: delete it and rerun the workflow to restart that "
           "training from scratch.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {_first_line(err)}). {fix}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of training "
                              f"state. {fix}")
    return state


def _first_line(err: Exception) -> str:
    """torch's unpickling errors run to many lines (and advise weights_only=False); keep the first."""
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""


def capture_rng() -> dict:
    """Global RNG states (python, numpy legacy, torch CPU, every CUDA device) as plain values/tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back the states from `capture_rng` (CUDA ones only where the same GPUs are visible)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if len(cuda) != torch.cuda.device_count():
        log.warning("checkpoint has RNG states for %d GPU(s) but %d are visible; CUDA RNG not restored",
                    len(cuda), torch.cuda.device_count())
        return
    torch.cuda.set_rng_state_all(cuda)
