"""What one training seed costs: per-rule job times of a finished run, read from Snakemake's
benchmark files (benchmarks/<rule>/.../seed<N>/...tsv), split into the shared part (download, HDF5,
test episodes, summary) and the part each seed replicates.

    .venv/bin/python bench/seed_cost.py WORKDIR

WORKDIR is a finished workflow directory (for the demo: the repository after
`snakemake --cores 2 --configfile configs/demo.yaml`). Job times are wall seconds of each job as
Snakemake measured them (`s`); with two jobs running at once on two cores they add up to about
twice the run's wall time. The benchmark files' ``cpu_time`` is not used: Snakemake samples it
every 30 s, so a job loses whatever it spent after its last sample (a 35-s meta_train job of the
demo showed 15 CPU s where ``/usr/bin/time`` counted 37). For CPU seconds, time the whole run.
"""
from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import context  # first: the machine beside every figure
import pandas as pd

SEED = re.compile(r"seed(\d+)")


def job_times(workdir: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted((workdir / "benchmarks").rglob("*.tsv")):
        relative = tsv.relative_to(workdir / "benchmarks")
        seed = SEED.search(str(relative))
        last = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"rule": relative.parts[0], "seed": int(seed.group(1)) if seed else None,
                     "wall_s": float(last["s"])})
    if not rows:
        sys.exit(f"no benchmark files under {workdir / 'benchmarks'}: run the workflow there first")
    return pd.DataFrame(rows).astype({"seed": "Int64"})


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    times = job_times(workdir)
    print(f"{context.machine_line()}; the run in {workdir} (the load now, not during it)")
    seeded = times[times["seed"].notna()]
    print("\njob wall seconds per rule and seed:")
    print(seeded.pivot_table(index="rule", columns="seed", values="wall_s", aggfunc="sum").round(1).to_string())
    totals = seeded.groupby("seed")["wall_s"].sum()
    shared = times[times["seed"].isna()]["wall_s"].sum()
    print(f"\none seed's replicate: {totals.mean():.1f} job-seconds wall (mean of {len(totals)} seeds, range "
          f"{totals.min():.1f}-{totals.max():.1f})")
    print(f"shared by all seeds (rules without a seed, benchmarked ones only): {shared:.1f} job-seconds wall")
    counts = defaultdict(int)
    for rule in seeded["rule"]:
        counts[rule] += 1
    print("jobs per seed:", ", ".join(f"{rule} {n // max(len(totals), 1)}" for rule, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
