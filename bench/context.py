"""What every bench shares: the machine beside each figure, synchronised timing, synthetic data, tables.

Figures from different machines, or from one machine under other load, are not comparable, so
every bench prints :func:`machine_line` once and each figure through :func:`figure`. Importing
this module also puts this checkout first on ``sys.path``, so a bench measures the ``mtl`` beside
it, not an installed copy. Light on purpose: neither torch nor numpy is imported here (the memory
benches measure their own peak RSS, and their parent process must never hold either); the helpers
that need them import them when called, and torch's thread count is shown once a bench has
imported it.

    import context  # first: this checkout's mtl
    context.figure(f"get_images: {rate:,.0f} images/s")

Also importable as ``bench.context`` (tests/gpu prints its agreement table with it).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

from mtl.machine import cpu_model  # noqa: E402  (needs the path above)


# ----------------------------------------------------------------------------- the machine
def torch_version() -> str:
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _threads() -> str:
    torch = sys.modules.get("torch")
    return f", {torch.get_num_threads()} torch threads" if torch is not None else ""


def context() -> str:
    """One short line: CPU model, CPU count, torch version (threads), 1-minute load average."""
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch_version()}{_threads()}, "
            f"load {os.getloadavg()[0]:.2f}")


def machine_line(device=None) -> str:
    """The header a bench prints first, with all three load averages, and the device it measures
    (the GPU's name on CUDA) when given one."""
    loads = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    line = (f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch_version()}{_threads()}, "
            f"load average {loads} (1 / 5 / 15 min)")
    if device is not None:
        line += f", device {device}"
        if getattr(device, "type", None) == "cuda":
            line += f" ({sys.modules['torch'].cuda.get_device_name(device)})"
    return line


def environment(device=None) -> dict[str, str]:
    """Versions and hardware a GPU figure depends on, as printable strings: Python, torch, CUDA,
    cuDNN, ``CUDA_VISIBLE_DEVICES``, the host and its CPU (:func:`context`), and on a CUDA
    ``device`` the card's name, capability, memory, visible GPU count and bf16 support."""
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
        "cpu threads": str(torch.get_num_threads()),
        "host": platform.node(),
        "CPU": context(),
    }
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "memory": f"{props.total_memory / 2**30:.1f} GiB",
            "visible GPUs": str(torch.cuda.device_count()),
            "bf16 supported": str(torch.cuda.is_bf16_supported()),
        })
    else:
        env.update({"device": f"CPU ({cpu_model()})", "capability": "n/a", "bf16 supported": "n/a"})
    return env


def add_device_options(parser) -> None:
    """``--device`` and ``--threads``, as every torch bench takes them (see :func:`device_from`)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def device_from(args):
    """Set torch's thread count from ``args.threads`` (0: leave it) and select ``args.device``."""
    import torch

    from mtl.device import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    return select_device(args.device)


def figure(text: str) -> None:
    """Print one measured figure with the context it was taken in."""
    print(f"{text}  [{context()}]", flush=True)


# ----------------------------------------------------------------------------- timing
def sync(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on a CPU."""
    if device is not None and str(device).startswith("cuda"):
        sys.modules["torch"].cuda.synchronize(device)


def timed(fn: Callable[[], object], device=None) -> tuple[object, float]:
    """``(fn(), seconds)``, synchronised with ``device`` before and after so that a GPU's queued
    work is neither charged to ``fn`` nor left out of it."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def seconds_per_iteration(run: Callable[[int], object], device, *, warmup: int, budget: float,
                          max_iters: int, min_iters: int = 2) -> tuple[float, int]:
    """Seconds per iteration of ``run(n)`` (which does n iterations) and the n timed.

    ``run(warmup)`` first, untimed (cuDNN plans, autotuning, the allocator); then one synchronised
    ``run(1)`` sizes n to fit ``budget`` seconds (min_iters..max_iters), and ``run(n)`` is timed
    whole: the total of n iterations / n, no median.
    """
    if warmup:
        run(warmup)
    _, probe = timed(lambda: run(1), device)
    n = int(min(max_iters, max(min_iters, budget / max(probe, 1e-6))))
    _, seconds = timed(lambda: run(n), device)
    return seconds / n, n


# ----------------------------------------------------------------------------- synthetic data
def synthetic_images(n: int, size: int, seed: int):
    """Random uint8 (n, size, size, 3) RGB images: costs do not depend on what the pixels show."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_synthetic_split(path: Path, images: int, classes: int, size: int, *, seed: int = 0,
                          dataset: str = "bench") -> Path:
    """An HDF5 split of ``images`` random ``size`` x ``size`` images in ``classes`` contiguous
    classes (sizes differing by at most one), written through the pipeline's own writer one class
    at a time (memory bounded by one class); its ``split`` attribute is the file's stem."""
    import numpy as np

    from mtl.data.hdf5 import write_split

    path = Path(path)
    rng = np.random.default_rng(seed)
    labels = np.sort(np.arange(images) % classes)
    counts = np.bincount(labels, minlength=classes)
    chunks = (rng.integers(0, 256, size=(int(count), size, size, 3), dtype=np.uint8) for count in counts)
    names = [f"c{c:03d}" for c in range(classes)]
    return write_split(path, chunks, labels, names, {"dataset": dataset, "split": path.stem})


# ----------------------------------------------------------------------------- Markdown for RESULTS.md
def table_header(columns: Sequence[str]) -> str:
    """A Markdown table's header and rule lines (print the rows with :func:`table_row` as they come)."""
    return table_row(columns) + "\n" + "|" + "---|" * len(columns)


def table_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(columns: Sequence[str], rows: Iterable[Iterable[object]]) -> str:
    return "\n".join([table_header(columns), *(table_row(row) for row in rows)])


def cell(values: dict, key: str, spec: str, missing: str = "skipped") -> str:
    """One table cell: ``values[key]`` formatted with ``spec``, or ``missing`` where it was not measured."""
    return format(values[key], spec) if key in values else missing
