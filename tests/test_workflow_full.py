"""The whole workflow, every rule, both shots and all four methods, through the Snakemake CLI."""
from __future__ import annotations

import json

import pandas as pd

from tests.workflow import job_counts, run_snakemake, scenario_config

METHODS = ["ft", "proto", "mtl", "mtl_ht"]


def test_tiny_scenario_runs_end_to_end_and_writes_a_complete_summary(tmp_path):
    result = run_snakemake(tmp_path, scenario_config("tiny"), "all", timeout=1200)
    counts = job_counts(result.stdout + result.stderr)
    assert counts["pretrain"] == 1 and counts["meta_train"] == 4 and counts["evaluate"] == 8, counts

    summary = pd.read_csv(tmp_path / "results/summary.csv")
    assert len(summary) == 8
    assert sorted(summary["method"].unique()) == sorted(METHODS)
    assert sorted(summary["shot"].unique()) == [1, 5]
    assert (summary[["way", "query", "episodes", "seed"]] == [3, 5, 20, 1]).all().all()
    assert summary["accuracy"].between(0, 100).all() and (summary["ci95"] >= 0).all()
    assert (summary["interval"] == "1.96*std/sqrt(n)").all()
    # every method but the baseline carries its paired difference against ft
    assert summary.loc[summary.method != "ft", "diff_vs_ft"].notna().all()
    assert summary.loc[summary.method == "ft", "diff_vs_ft"].isna().all()
    assert "| digits |" in (tmp_path / "results/summary.md").read_text()
    for plot in ("accuracy", "training"):
        assert (tmp_path / f"results/plots/{plot}.png").stat().st_size > 0

    # every method of a shot was scored on the same saved episodes
    for shot in (1, 5):
        ids = {m: pd.read_csv(tmp_path / f"results/digits/resnet12/{m}/{shot}shot/episodes.csv")["episode"].tolist() for m in METHODS}
        assert all(ids[m] == ids["ft"] for m in METHODS)

    # inference.batch_size: auto was measured for this machine and model, and cached for later jobs
    cache = json.loads((tmp_path / "results/.cache/inference_batch_size.json").read_text())
    assert cache and all(key.endswith("resnet12 width 0.125 | 16 px") for key in cache)
    assert all(entry["batch_size"] in (4, 8, 16, 32, 64, 128, 256, 512) for entry in cache.values())

    # the HTML report renders from the finished run
    run_snakemake(tmp_path, scenario_config("tiny"), "--report", str(tmp_path / "report.html"))
    assert (tmp_path / "report.html").stat().st_size > 10_000
