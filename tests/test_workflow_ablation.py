"""`snakemake ablation` through the CLI: the full protocol's plan (dry run) holds every arm for both
datasets and shots; a tiny real run writes the table, every arm scored on the same saved episodes,
with the inference batch size config.yaml leaves to measurement (`auto`)."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml

from mtl.batching import CACHE_FILE, CANDIDATES
from mtl.methods import NAMES, meta_trained
from tests.workflow import REPO, deep_merge, inference_cache, job_counts, run_snakemake, scenario_config

#: The tiny scenario cut to one shot: two seeds x eleven arms still runs about 40 jobs. Four test
#: episodes and no calibration (`calibration.episodes: 0`, temperature 1): ft_last and ft_all adapt
#: each episode alone for 100 steps, most of the run's CPU time at 10 + 10 (what they compute is
#: tested in tests/test_finetune.py, calibration in the shared runs); the claims here (every arm in
#: the table, scored on one episode file) hold for any count.
TINY_ABLATION = {"protocol": {"seeds": [1, 2], "shots": [1], "test_episodes": 4}, "calibration": {"episodes": 0}}


def planned_metrics(output: str) -> set[tuple[str, str, str, str]]:
    """(dataset, seed, arm, shot) of every metrics.json the dry run plans."""
    pattern = r"results/(\w+)/resnet12/seed(\d+)/(\w+)/(\d+)shot/metrics\.json"
    return set(re.findall(pattern, output))


def test_dry_run_of_the_full_protocol_lists_every_arm_for_both_datasets_and_shots(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    result = run_snakemake(tmp_path, config, "-n", "ablation")
    counts = job_counts(result.stdout)
    seeds, datasets, shots = config["protocol"]["seeds"], ["miniimagenet", "fc100"], [1, 5]
    expected = {(d, str(s), arm, str(k)) for d in datasets for s in seeds for arm in NAMES for k in shots}
    assert planned_metrics(result.stdout) == expected
    assert counts["evaluate"] == len(expected) == 2 * 3 * 11 * 2  # datasets x seeds x arms x shots
    assert counts["meta_train"] == 2 * 3 * len(meta_trained(NAMES)) * 2
    assert counts["pretrain"] == counts["random_init"] == 2 * 3  # one of each per dataset and seed
    assert counts["episodes"] == 4 and counts["ablation"] == 1


def test_the_ablation_demo_config_plans_every_arm(tmp_path):
    """configs/ablation_demo.yaml on top of config.yaml, as `--configfile` does from the repository."""
    config = deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()),
                        yaml.safe_load((REPO / "configs/ablation_demo.yaml").read_text()))
    result = run_snakemake(tmp_path, config, "-n", "ablation")
    assert planned_metrics(result.stdout) == {("digits", s, arm, k) for s in ("1", "2") for arm in NAMES
                                               for k in ("1", "5")}
    assert set(config["methods"]) == set(NAMES)  # its summary lists every arm too


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablation")
    result = run_snakemake(workdir, scenario_config("tiny", TINY_ABLATION), "ablation", timeout=1800)
    return workdir, job_counts(result.stdout + result.stderr)


@pytest.mark.slow
def test_ablation_runs_every_arm_and_writes_the_table(ablation_run):
    workdir, counts = ablation_run
    assert counts["evaluate"] == 2 * len(NAMES) and counts["meta_train"] == 2 * len(meta_trained(NAMES))
    assert counts["random_init"] == 2 and counts["pretrain"] == 2
    table = pd.read_csv(workdir / "results/ablation.csv")
    assert list(table["arm"]) == list(NAMES)
    assert (table["digits_1shot_n_seeds"] == 2).all()
    assert table["digits_1shot_accuracy"].between(0, 100).all() and (table["digits_1shot_ci95"] >= 0).all()
    others = table[table["arm"] != "ft"]
    assert others["digits_1shot_diff_vs_ft"].notna().all() and others["digits_1shot_diff_vs_ft_ci95"].notna().all()
    assert table["digits_1shot_paper_accuracy"].isna().all()  # 3-way digits: no published figure
    text = (workdir / "results/ablation.md").read_text()
    assert all(f"| `{arm}` |" in text for arm in NAMES)


@pytest.mark.slow
def test_every_arm_and_seed_was_scored_on_the_same_episodes(ablation_run):
    workdir, _ = ablation_run
    metrics = [json.loads(path.read_text()) for path in workdir.glob("results/digits/*/seed*/*/1shot/metrics.json")]
    assert sorted({(m["method"], m["seed"]) for m in metrics}) == sorted((a, s) for a in NAMES for s in (1, 2))
    assert len({m["episodes_sha256"] for m in metrics}) == 1
    assert len({m["episodes_file"] for m in metrics}) == 1
    ids = {tuple(pd.read_csv(path)["episode"]) for path in workdir.glob("results/digits/*/seed*/*/1shot/episodes.csv")}
    assert len(ids) == 1


@pytest.mark.slow
def test_the_no_pretrain_arm_starts_from_the_untrained_encoder(ablation_run):
    """Meta-training freezes the conv weights, so a model keeps those of the encoder it started from."""
    import torch

    workdir, _ = ablation_run
    run = workdir / "results/digits/resnet12"
    def conv(path):
        return torch.load(run / path, weights_only=True)["state_dict"]["layer2.conv1.weight"]

    for seed in (1, 2):
        start, pretrained = conv(f"seed{seed}/random_init/encoder.pt"), conv(f"seed{seed}/pretrain/encoder.pt")
        assert torch.equal(conv(f"seed{seed}/mtl_no_pretrain/1shot/model.pt"), start)
        assert torch.equal(conv(f"seed{seed}/mtl/1shot/model.pt"), pretrained)
        assert not torch.equal(start, pretrained)
        protocol = torch.load(run / f"seed{seed}/mtl_last/1shot/model.pt", weights_only=True)["protocol"]
        assert protocol["method"] == "mtl_last" and protocol["scope"] == "last"


@pytest.mark.slow
def test_inference_batch_size_was_measured_and_cached_for_the_next_jobs(ablation_run):
    """inference.batch_size: auto, measured on this machine for this model (the test runs of this
    session share one cache, new each session: the entry cannot come from an earlier run)."""
    cache = json.loads((inference_cache() / CACHE_FILE).read_text())
    entries = [entry for key, entry in cache.items() if key.endswith("resnet12 width 0.125 | 16 px")]
    assert entries and all(entry["batch_size"] in CANDIDATES for entry in entries)
    assert not (ablation_run[0] / "results/.cache").exists()  # MTL_INFERENCE_CACHE replaced the default folder
