"""What one training seed costs: per-rule job times of a finished run, read from Snakemake's
benchmark files (benchmarks/<rule>/.../seed<N>/...tsv), split into the shared part (download, HDF5,
test episodes, summary) and the part each seed replicates.

    .venv/bin/python bench/seed_cost.py WORKDIR

WORKDIR is a finished workflow directory (for the demo: the repository after
`snakemake --cores 2 --configfile configs/demo.yaml`). Job times are wall seconds of each job as
Snakemake measured them (`s`) and the CPU seconds of its process tree (`cpu_time`); with two jobs
running at once on two cores they add up to about twice the run's wall time.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

SEED = re.compile(r"seed(\d+)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def job_times(workdir: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted((workdir / "benchmarks").rglob("*.tsv")):
        relative = tsv.relative_to(workdir / "benchmarks")
        seed = SEED.search(str(relative))
        last = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"rule": relative.parts[0], "seed": int(seed.group(1)) if seed else None,
                     "wall_s": float(last["s"]), "cpu_s": float(last["cpu_time"])})
    if not rows:
        sys.exit(f"no benchmark files under {workdir / 'benchmarks'}: run the workflow there first")
    return pd.DataFrame(rows).astype({"seed": "Int64"})


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    times = job_times(workdir)
    print(f"# {cpu_model()}, {os.cpu_count()} cores, load average now {os.getloadavg()[0]:.2f}; run in {workdir}")
    seeded = times[times["seed"].notna()]
    per_seed = seeded.groupby(["seed", "rule"])[["wall_s", "cpu_s"]].sum().unstack("seed")
    print("\njob seconds per rule and seed (wall / cpu):")
    print(per_seed.round(1).to_string())
    totals = seeded.groupby("seed")[["wall_s", "cpu_s"]].sum()
    shared = times[times["seed"].isna()][["wall_s", "cpu_s"]].sum()
    print(f"\none seed's replicate: {totals['wall_s'].mean():.1f} job-seconds wall, {totals['cpu_s'].mean():.1f} CPU s "
          f"(mean of {len(totals)} seeds, range {totals['wall_s'].min():.1f}-{totals['wall_s'].max():.1f} wall)")
    print(f"shared by all seeds (rules without a seed, benchmarked ones only): {shared['wall_s']:.1f} job-seconds wall, "
          f"{shared['cpu_s']:.1f} CPU s")
    counts = defaultdict(int)
    for rule in seeded["rule"]:
        counts[rule] += 1
    print("jobs per seed:", ", ".join(f"{rule} {n // max(len(totals), 1)}" for rule, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
