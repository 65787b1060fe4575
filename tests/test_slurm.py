"""profiles/slurm against a real local Slurm (tests/slurm_cluster.py).

Marked `slurm`; they run only with MTL_TEST_SLURM=1 (or CI=true). Each workflow scenario is one
call of :func:`run_workflow_on_slurm` with a config overlay and targets, plus what to check.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.slurm_cluster import (
    SLURM_PROFILE,
    SlurmCluster,
    WorkflowRun,
    run,
    run_workflow_on_slurm,
    venv_env,
)
from tests.workflow import REPO, scenario_config


def assert_all_remote_jobs_went_through_slurm(result: WorkflowRun, cluster: SlurmCluster) -> None:
    assert result.returncode == 0, result.explain()
    unsubmitted = {job: rule for job, rule in result.remote_jobs.items() if job not in result.submitted}
    assert not unsubmitted, f"jobs run without sbatch: {unsubmitted}\n{result.explain()}"
    states = cluster.jobs_state(list(result.submitted.values()))
    failed = {job: state for job, state in states.items() if state != "COMPLETED"}
    assert not failed and len(states) == len(result.submitted), f"Slurm job states {states}\n{result.explain()}"


@pytest.mark.slow
@pytest.mark.slurm
def test_gpu_request_sets_cuda_visible_devices(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "gpu-%j.out"
    job = run(
        ["sbatch", "--parsable", "--wait", "--gpus=1", "--mem=100", "-t", "5", "-o", str(out),
         "--wrap", "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"],
        timeout=120,
    )  # fmt: skip
    job_id = job.stdout.strip().split(";")[0]
    printed = (tmp_path / f"gpu-{job_id}.out").read_text().strip()
    assert printed in {f"CUDA_VISIBLE_DEVICES={i}" for i in range(slurm_cluster.gpus)}, printed


#: Every rule of the workflow, each at least once: the tiny scenario cut to one shot and two methods (a
#: fresh learner and a meta-trained one), 9 Slurm jobs where all five methods at both shots took 28.
#: Each Slurm job waits on the plugin's status checks, whatever it computes; every method and shot
#: runs through the same rules in the local workflow tests (tests/test_workflow_full.py).
SLURM_SCENARIO = scenario_config("tiny", {"protocol": {"shots": [1]}, "methods": ["ft", "mtl"]})


@pytest.mark.slow
@pytest.mark.slurm
def test_whole_workflow_runs_through_slurm_and_gpu_rules_get_a_slurm_gpu(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # One CPU per job (the scenario's jobs run one torch thread, `threads: 1`): the node's two CPUs
    # and two GPUs then run two jobs at a time; asking for both CPUs would run them one by one.
    result = run_workflow_on_slurm(slurm_cluster, tmp_path / "run", ["all"], config=SLURM_SCENARIO, timeout=1200,
                                   max_threads=1)

    assert_all_remote_jobs_went_through_slurm(result, slurm_cluster)
    # Downloads are a localrule: they run where snakemake runs, never on a compute node.
    assert "download" in result.local_jobs.values(), result.explain()
    for rule in ("build_hdf5", "pretrain", "meta_train", "episodes", "evaluate", "export_model", "summarize"):
        assert rule in result.remote_jobs.values(), result.explain()
    summary = pd.read_csv(result.workdir / "results" / "summary.csv")
    assert len(summary) == 2 and summary["accuracy"].notna().all()  # ft and mtl, 1-shot
    # Slurm (--gpus=1) chose the GPU: every GPU job's log names the CUDA_VISIBLE_DEVICES it was given.
    # The fake GPUs have no CUDA behind them, so `device: auto` then runs on the CPU.
    for rule in ("pretrain", "meta_train", "evaluate"):
        logs = list((result.workdir / "logs" / rule).rglob("*.log"))
        assert logs, result.explain()
        for log in logs:
            assert re.search(r"CUDA_VISIBLE_DEVICES='\d'", log.read_text()), log
    slurm_logs = list((result.workdir / ".snakemake" / "slurm_logs" / "rule_pretrain").rglob("*.log"))
    assert slurm_logs, result.explain()


def test_slurm_profile_dry_run_shows_what_each_rule_requests(tmp_path: Path) -> None:
    """A dry run parses every profile key against the plugin's options and prints each job's
    request; needs no Slurm."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(scenario_config("tiny"), sort_keys=False))
    cmd = [
        sys.executable, "-m", "snakemake", "-n", "all", "--cores", "64",
        "--profile", str(SLURM_PROFILE),
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(tmp_path),
        "--configfile", str(config),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=venv_env(), capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    requests = dict(re.findall(r"^(?:local)?rule (\w+):\n(?:\s+.*\n)*?\s+resources: (.*)$", output, re.MULTILINE))
    for rule in ("pretrain", "meta_train", "evaluate"):
        assert "gpu=1" in requests[rule] and "mem_mb=" in requests[rule] and "runtime=" in requests[rule], requests
    for rule in ("build_hdf5", "episodes", "summarize"):
        assert "gpu=" not in requests[rule], requests
