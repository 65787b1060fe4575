"""What every bench figure is printed beside: CPU model, CPU count, torch version, threads, load average.

Figures from different machines, or from one machine under other load, are not comparable, so
every bench prints :func:`machine_line` once and each figure through :func:`figure`. Importing
this module also puts this checkout first on ``sys.path``, so a bench measures the ``mtl`` beside
it, not an installed copy. Light on purpose: torch is not imported here (the memory benches
measure their own peak RSS); its thread count is shown once a bench has imported it.

    import context  # first: this checkout's mtl
    context.figure(f"get_images: {rate:,.0f} images/s")
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

from mtl.machine import cpu_model  # noqa: E402  (needs the path above)


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


def machine_line() -> str:
    """The header a bench prints first, with all three load averages."""
    loads = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch_version()}{_threads()}, "
            f"load average {loads} (1 / 5 / 15 min)")


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
