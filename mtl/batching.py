"""The batch size of inference passes, chosen per device by measurement and cached.

Every pass that embeds images without gradients (meta-test, the validation passes of
pre-training and meta-training) runs in batches, and the best size depends on the device far
more than one would guess: on 2-core CPUs batches of 8-16 images run about twice as fast as 256
(the activations of a large batch no longer fit the caches), on a GPU large batches win. So
the size is measured, not assumed:

- :func:`probe_rates` times a few sizes, smallest first, on a fresh copy of the backbone
  (random weights: the cost does not depend on their values) through the real embedding path
  (:func:`mtl.base_learner.embed_batch`), sweeping up within a time budget (default 1.5 s),
  then once more down (so warm-up cannot favour the sizes timed last);
- :func:`pick_batch_size` takes the smallest size within 5% of the best rate. On a CPU the probe's
  few passes over the same images can flatter a large batch (seen on an idle 2-core Xeon: 64 at
  580 images/s vs 32 at 557 in the probe, then 430 vs 680 in the real meta-test: memory traffic
  the probe does not reproduce), while a size that really is faster, as large batches on a GPU
  or on a loaded CPU, wins by far more than 5%.
- :class:`BatchSizeCache` keeps the choice in ``<cache folder>/inference_batch_size.json`` per
  :func:`cache_key`: device (CPU model or GPU name), torch threads, torch version, backbone,
  width and image size. Each machine probes once; delete the file (or its entry) to probe again.
  ``$MTL_INFERENCE_CACHE`` names a folder that replaces the caller's (one cache for every project
  on a machine: fresh clones then embed with the same batch and reproduce each other bit for bit).

:func:`inference_batch_size` puts them together; the config key ``inference.batch_size`` is
``auto`` (probe, cached) or a fixed integer (no probe).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from mtl.errors import ConfigError
from mtl.io import atomic_path
from mtl.machine import cpu_model

log = logging.getLogger(__name__)

AUTO = "auto"
CANDIDATES = (4, 8, 16, 32, 64, 128, 256, 512)
PROBE_BUDGET_S = 1.5
TOLERANCE = 0.05  # sizes within 5% of the best rate count as equally fast; the smallest wins
CACHE_FILE = "inference_batch_size.json"
CACHE_ENV = "MTL_INFERENCE_CACHE"  # a cache folder that replaces the caller's (share one across projects)


# ----------------------------------------------------------------------------- setting
def parse_setting(setting) -> int | None:
    """The config value ``inference.batch_size``: None for ``auto``, else the fixed size (>= 1).

    Digits in a string count as the integer (a nested ``--config`` value arrives as a string).
    """
    if isinstance(setting, str) and setting.strip().lower() == AUTO:
        return None
    if isinstance(setting, str) and setting.strip().isdigit():
        setting = int(setting)
    if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or setting < 1:
        raise ConfigError(f"inference.batch_size must be 'auto' or an integer >= 1, got {setting!r}; "
                          "fix it in config.yaml")
    return int(setting)


# ----------------------------------------------------------------------------- cache key
def device_name(device: torch.device) -> str:
    """What decides a device's speed: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"cpu {cpu_model()}"


def cache_key(device: str, threads: int, backbone: str, width: float, image_size: int,
              torch_version: str = torch.__version__) -> str:
    """One readable line per (machine, model, image size): the cache's key."""
    return (f"{device} | {threads} threads | torch {torch_version} | "
            f"{backbone} width {float(width):g} | {int(image_size)} px")


# ----------------------------------------------------------------------------- probe
def probe_rates(run_batch: Callable[[int], None], candidates: Iterable[int] = CANDIDATES,
                budget_s: float = PROBE_BUDGET_S,
                timer: Callable[[], float] = time.perf_counter) -> dict[int, float]:
    """Images per second of ``run_batch(size)`` for the sizes that fit in ``budget_s``.

    Sizes are tried smallest first, each with one untimed pass (the first pass at a new shape
    builds its kernels) and one timed pass; the smallest is always measured. The next size is
    tried while two passes as long as the last timed one still fit in the budget: a pass of a
    larger batch takes at least that long, and often little more (threads waiting for each other
    cost per pass, not per image), so the probe ends within about twice the budget at worst.
    Then every measured size is timed once more, largest first, whatever the budget (at most as
    long as the sweep's timed passes): what slowed the sweep's first sizes (the process's first
    kernels, a CPU clocking up; on an idle 2-core Xeon it once halved the rates of 4 - 32 and
    made the probe keep 128, 1.5x slower than 32 there) now falls on the other end. Budget left
    over re-times every size again. Each size keeps its best rate (other work on the machine can
    only slow a pass down). A size the device has no memory for ends the sweep.
    """
    start = timer()
    rates: dict[int, float] = {}

    def timed_rate(size: int) -> float:
        began = timer()
        run_batch(size)
        return size / max(timer() - began, 1e-9)

    for size in sorted(set(candidates)):
        last_pass = max(rates) / rates[max(rates)] if rates else 0.0
        if rates and timer() - start + 2 * last_pass > budget_s:
            break
        try:
            run_batch(size)
            rates[size] = timed_rate(size)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            break
    for size in sorted(rates, reverse=True):
        rates[size] = max(rates[size], timed_rate(size))
    while rates and timer() - start + sum(size / rate for size, rate in rates.items()) <= budget_s:
        for size in rates:
            rates[size] = max(rates[size], timed_rate(size))
    return rates


def pick_batch_size(rates: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest size whose rate is within ``tolerance`` of the best."""
    if not rates:
        raise ValueError("pick_batch_size needs at least one measured size")
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1 - tolerance) * best)


def embedding_probe(backbone: str, width: float, image_size: int, device: torch.device) -> Callable[[int], None]:
    """``run_batch(size)``: embed ``size`` random images with a fresh backbone, as `embed` does."""
    from mtl.data.transforms import EvalTransform
    from mtl.models import build_backbone, inference_copy
    from mtl.base_learner import embed_batch

    model = inference_copy(build_backbone(backbone, width=width).to(device))
    transform = EvalTransform(image_size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(max(CANDIDATES), image_size, image_size, 3), dtype=np.uint8)

    def run_batch(size: int) -> None:
        embed_batch(model, images[:size], transform, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run_batch


# ----------------------------------------------------------------------------- cache
class BatchSizeCache:
    """``<folder>/inference_batch_size.json``: {key: {"batch_size", "images_per_s", ...}}.

    A disposable record: an unreadable file is a warning and is rewritten, never an error.
    Read-probe-write happens under a lock file, so jobs starting together on one machine probe
    once (one after the other, the later ones read the first one's result) and never measure
    each other's load.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / CACHE_FILE

    def entries(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("inference batch cache %s is unreadable (%s); probing again and rewriting it",
                        self.path, error)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> int | None:
        entry = self.entries().get(key)
        size = entry.get("batch_size") if isinstance(entry, dict) else None
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None

    def put(self, key: str, entry: dict) -> None:
        entries = {**self.entries(), key: entry}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(entries, indent=2) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- entry point
def inference_batch_size(setting, backbone: dict, device: torch.device | str, *,
                         cache_dir: str | os.PathLike | None = None, budget_s: float = PROBE_BUDGET_S,
                         run_batch: Callable[[int], None] | None = None,
                         timer: Callable[[], float] = time.perf_counter) -> int:
    """The batch size for embedding with ``backbone`` on ``device``: fixed, cached, or probed now.

    ``setting``: ``inference.batch_size`` ("auto" or an integer). ``backbone``: {name, width,
    image_size (None: the backbone's native size)}, as config.yaml's ``backbone``. ``cache_dir``:
    folder of the cache file (None: probe every time); ``$MTL_INFERENCE_CACHE``, when set, replaces
    it. ``run_batch`` / ``timer`` replace the real embedding and clock (tests).
    """
    fixed = parse_setting(setting)
    if fixed is not None:
        return fixed
    cache_dir = os.environ.get(CACHE_ENV) or cache_dir
    from mtl.models import backbone_class

    device = torch.device(device)
    name, width = backbone["name"], float(backbone.get("width", 1.0))
    image_size = int(backbone.get("image_size") or backbone_class(name).native_size)
    key = cache_key(device_name(device), torch.get_num_threads(), name, width, image_size)
    if cache_dir is None:
        return _measure(key, name, width, image_size, device, budget_s, run_batch, timer)["batch_size"]
    cache = BatchSizeCache(cache_dir)
    with cache.locked():
        cached = cache.get(key)
        if cached is not None:
            log.info("inference batch size %d (cached in %s for %s)", cached, cache.path, key)
            return cached
        entry = _measure(key, name, width, image_size, device, budget_s, run_batch, timer)
        cache.put(key, entry)
    return entry["batch_size"]


def _measure(key, name, width, image_size, device, budget_s, run_batch, timer) -> dict:
    began = timer()
    run_batch = run_batch or embedding_probe(name, width, image_size, device)
    # the budget bounds the whole probe, building the model included
    rates = probe_rates(run_batch, CANDIDATES, budget_s - (timer() - began), timer)
    size = pick_batch_size(rates)
    seconds = timer() - began
    log.info("inference batch size %d, probed in %.1f s for %s; images/s by size: %s", size, seconds, key,
             ", ".join(f"{s}: {r:.0f}" for s, r in sorted(rates.items())))
    return {"batch_size": size, "images_per_s": {str(s): round(r, 1) for s, r in sorted(rates.items())},
            "probe_seconds": round(seconds, 2), "budget_s": budget_s,
            "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": round(os.getloadavg()[0], 2)}
