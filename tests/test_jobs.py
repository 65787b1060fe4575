"""mtl.jobs.open_gpu_job: the one opening of every job that runs torch (threads, device, inference batch)."""
from __future__ import annotations

import re

import pytest
import torch

from mtl.batching import BatchSizeCache, cache_key, device_name
from mtl.errors import ConfigError
from mtl.jobs import open_gpu_job
from tests.workflow import REPO

BACKBONE = {"name": "resnet12", "width": 0.25, "image_size": 32}


def test_a_fixed_inference_batch_needs_no_probe_and_no_backbone():
    with open_gpu_job(threads=2, device="cpu", inference_batch=16) as job:
        assert torch.get_num_threads() == 2
        assert job.device == torch.device("cpu") and job.inference_batch_size == 16
        assert job.arguments() == {"device": torch.device("cpu"), "inference_batch_size": 16}


def test_auto_is_read_for_the_configured_threads_so_they_are_set_first(tmp_path):
    """The measurement is cached per thread count: the job must look it up with the configured
    threads, not with whatever the process had before."""
    cache = BatchSizeCache(tmp_path)
    for threads, size in ((1, 8), (3, 24)):
        key = cache_key(device_name(torch.device("cpu")), threads, "resnet12", 0.25, 32)
        cache.put(key, {"batch_size": size})
    torch.set_num_threads(1)  # the conftest fixture restores it
    with open_gpu_job(threads=3, device="cpu", inference_batch="auto", backbone=BACKBONE, cache_dir=tmp_path) as job:
        assert job.inference_batch_size == 24


def test_auto_without_the_backbone_it_would_measure_is_refused():
    with pytest.raises(ConfigError, match="needs the backbone"):
        with open_gpu_job(device="cpu", inference_batch="auto"):
            pass
    with pytest.raises(ConfigError, match="inference.batch_size must be 'auto' or an integer >= 1"):
        with open_gpu_job(device="cpu", inference_batch=0):
            pass


def test_a_job_without_inference_passes_gets_the_device_alone():
    with open_gpu_job(device="cpu") as job:
        assert job.inference_batch_size is None and job.arguments() == {"device": torch.device("cpu")}


def gpu_rule_scripts() -> dict[str, str]:
    """{rule: its workflow script} of every rule that asks for a GPU (resource `gpu`)."""
    scripts = {}
    for path in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule |use rule )", path.read_text()):
            name = re.match(r"rule (\w+):", block)
            script = re.search(r'script:\s+"\.\./(workflow_scripts/\w+\.py)"', block)
            if name and script and re.search(r"\n\s+gpu=", block):
                scripts[name.group(1)] = script.group(1)
    return scripts


def test_every_gpu_rule_opens_its_job_through_open_gpu_job_and_nothing_else():
    """One opening, not a copy per script: a script that set threads or claimed a device itself
    could drift from the others (thread count from --cores, a GPU shared by two jobs)."""
    scripts = gpu_rule_scripts()
    assert set(scripts) == {"pretrain", "meta_train", "evaluate", "predict"}
    for rule, script in scripts.items():
        text = (REPO / script).read_text()
        assert "snakemake.params.gpu_job" in text, rule
        assert "open_gpu_job(" in text or "launch(" in text, rule  # launch opens one job per process
    for script in (REPO / "workflow_scripts").glob("*.py"):
        text = script.read_text()
        for opening in ("set_num_threads", "claim_device", "select_device", "inference_batch_size("):
            assert opening not in text, f"{script.name} calls {opening} itself"
