"""What the CPU-vs-GPU agreement tests share: the CUDA device, full CPU threads for the CPU
reference, and a record of every measured difference, printed after the run with a Markdown table
for bench/RESULTS.md (a pass or fail alone says too little: the margins are the result)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
import torch

from bench import context
from mtl.device import autocast_dtype, select_device


class Measurements:
    """Each test's measured differences: one line each, and per backbone the figures of the table."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.table: dict[str, dict[str, float]] = defaultdict(dict)

    def add(self, backbone: str, line: str, **figures: float) -> None:
        self.lines.append(line)
        self.table[backbone].update(figures)

    def markdown(self) -> str:
        columns = ["backbone", "features fp32 rel. diff (tol 1e-03)", "features AMP rel. diff (tol 5e-02)",
                   "meta gradient rel. err fp32 (tol 1e-03)", "meta gradient rel. err AMP (reported)",
                   "eval predictions flipped (1- + 5-shot)"]
        rows = []
        for name, figures in self.table.items():
            flips = [value for key, value in figures.items() if key.startswith("flips_")]
            rows.append([name, context.cell(figures, "fp32_rel", ".1e", "-"),
                         context.cell(figures, "amp_rel", ".1e", "-"), context.cell(figures, "grad_rel", ".1e", "-"),
                         context.cell(figures, "grad_rel_amp", ".1e", "-"), sum(flips) if flips else "-"])
        return context.markdown_table(columns, rows)


MEASURED = Measurements()


@pytest.fixture(scope="session")
def measured() -> Measurements:
    return MEASURED


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    return select_device("cuda")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Overrides tests/conftest.py's one-thread limit (set for the two shared cores of the CPU test
    machine): the CPU reference runs full-width networks, and a GPU machine's cores are this run's."""
    yield


def pytest_report_header(config) -> list[str]:
    if not torch.cuda.is_available():
        return []
    device = torch.device("cuda")
    env = context.environment(device)
    return [f"GPU agreement: {env['device']} ({env['memory']}, capability {env['capability']}), torch {env['torch']}, "
            f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, AMP dtype {autocast_dtype(device)}, TF32 defaults "
            f"(matmul, cudnn) {torch.backends.cuda.matmul.allow_tf32}, {torch.backends.cudnn.allow_tf32}; "
            f"host CPU {env['CPU']}"]


def pytest_terminal_summary(terminalreporter) -> None:
    if not MEASURED.lines:
        return
    terminalreporter.write_sep("=", "CPU vs GPU: measured differences")
    for line in MEASURED.lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line("")
    terminalreporter.write_line(MEASURED.markdown())
