"""The benches a GPU session runs first must still run: device time is scarce and a bench broken
by a library change costs a whole session's tries (issue 13's new `_Run` argument once broke
`bench/pretrain_scaling.py` unnoticed). These run the CPU dry runs only; no figure is checked."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each runs a bench script in its own process (5-20 s apiece on an idle core): out of the quick loop
pytestmark = pytest.mark.slow


def test_pretrain_scaling_cpu_dry_run_measures_every_process_count():
    result = subprocess.run([sys.executable, "bench/pretrain_scaling.py", "--cpu-dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, result.stdout[-3000:]
    assert not any("failed" in row for row in rows), result.stdout[-3000:]


def test_gpu_check_cpu_smoke_runs_the_agreement_tests_then_the_throughput_bench():
    """bench/gpu_check.sh with no GPU: the agreement tests are collected and skip (none errors at
    import), and the throughput bench still runs to its table for every backbone."""
    # this Python; CPU-only even where a GPU is visible
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert re.search(r"^=+ \d+ skipped in [\d.]+s =+$", result.stdout, re.MULTILINE), result.stdout[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| resnet12 |", "| resnet25 |"))]
    assert len(rows) == 2, result.stdout[-3000:]


def test_meta_gradient_precision_cpu_run_compares_float32_with_float64():
    result = subprocess.run([sys.executable, "bench/meta_gradient_precision.py", "--device", "cpu", "--width",
                             "0.0625", "--backbones", "resnet12"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"CPU fp32 vs CPU fp64 +\d\.\d\de-\d\d / \d\.\d\de-\d\d", result.stdout), result.stdout[-3000:]
