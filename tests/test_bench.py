"""The benches a GPU session runs first must still run: device time is scarce and a bench broken
by a library change costs a whole session's tries (issue 13's new `_Run` argument once broke
`bench/pretrain_scaling.py` unnoticed). These run the CPU dry runs only; no figure is checked."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_scaling_cpu_dry_run_measures_every_process_count():
    result = subprocess.run([sys.executable, "bench/pretrain_scaling.py", "--cpu-dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, result.stdout[-3000:]
    assert not any("failed" in row for row in rows), result.stdout[-3000:]
