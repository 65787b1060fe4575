"""The whole workflow through the Snakemake CLI: every rule, both shots, all five methods, training
seeds as replicates, the across-seed summary, its verdicts and the report; that numbers depend
only on the seed, not on which other seeds run or on --cores; and transfer evaluation (models
trained on digits scored on a test-only folder) beside unchanged in-domain rows.

The runs are the session's shared ones (tests/conftest.py): tiny_two_seeds (seeds 1 and 2, two jobs
at a time) and tiny_seed_two_alone (seed 2 alone, one job at a time); transfer is added to a copy of
the first."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mtl.data.hdf5 import HDF5Split
from mtl.stats import SEED_INTERVAL
from tests.summary_check import assert_summary_matches_per_seed
from tests.workflow import REPO, SCENARIOS, job_counts, run_snakemake

METHODS = ["ft", "logreg", "proto", "mtl", "mtl_ht"]  # config.yaml's default `methods`
#: What a run's numbers are; identical reruns must reproduce these columns exactly.
NUMBERS = ["accuracy", "ci95", "diff_vs_ft", "diff_vs_ft_ci95"]
#: The jobs of the training chain and its in-domain scoring (what adding transfer must not rerun).
IN_DOMAIN_RULES = {"build_hdf5", "pretrain", "meta_train", "evaluate", "export_model"}


@pytest.mark.slow
def test_each_seed_replicates_the_training_chain(tiny_two_seeds):
    workdir, counts = tiny_two_seeds.workdir, tiny_two_seeds.counts
    # seeds x shots: 2 x 2 x (mtl, mtl_ht) meta-trained; 2 x 2 x 5 methods evaluated
    assert counts["pretrain"] == 2 and counts["meta_train"] == 8 and counts["evaluate"] == 20, counts
    assert counts["episodes"] == 2, "the test episodes are shared by every seed"
    for seed in (1, 2):
        assert (workdir / f"results/digits/resnet12/seed{seed}/pretrain/encoder.pt").stat().st_size > 0
        assert (workdir / f"checkpoints/digits/resnet12/seed{seed}/pretrain/last.pt").exists()


@pytest.mark.slow
def test_summary_aggregates_over_seeds_and_states_verdicts(tiny_two_seeds):
    workdir = tiny_two_seeds.workdir
    summary = pd.read_csv(workdir / "results/summary.csv")
    assert len(summary) == 10  # 5 methods x 2 shots
    assert sorted(summary["method"].unique()) == sorted(METHODS) and sorted(summary["shot"].unique()) == [1, 5]
    assert (summary[["way", "query", "episodes", "episode_seed", "n_seeds"]] == [3, 5, 20, 1, 2]).all().all()
    assert (summary["seeds"] == "1 2").all()
    assert summary["accuracy"].between(0, 100).all() and (summary["ci95"] >= 0).all()
    assert summary["interval"].str.startswith("t(0.975,n_seeds-1)").all()
    others = summary[summary.method != "ft"]
    assert others["diff_vs_ft"].notna().all() and others["diff_vs_ft_ci95"].notna().all()
    assert (others["seeds_above_ft"] + others["seeds_below_ft"] <= 2).all()
    assert (others["seeds_paired_with_ft"] == 2).all()
    assert summary.loc[summary.method == "ft", "diff_vs_ft"].isna().all()

    per_seed = pd.read_csv(workdir / "results/summary_per_seed.csv")
    assert len(per_seed) == 20 and sorted(per_seed["seed"].unique()) == [1, 2]
    assert_summary_matches_per_seed(summary, per_seed)

    text = (workdir / "results/summary.md").read_text()
    verdicts = [line for line in text.splitlines() if line.startswith("- ") and " vs ft, digits " in line]
    assert len(verdicts) == 8 and all("points over 2 seeds" in line for line in verdicts)
    for plot in ("accuracy", "training"):
        assert (workdir / f"results/plots/{plot}.png").stat().st_size > 0

    # every method and seed of a shot was scored on the same saved episodes
    for shot in (1, 5):
        ids = [pd.read_csv(workdir / f"results/digits/resnet12/seed{seed}/{m}/{shot}shot/episodes.csv")["episode"].tolist()
               for m in METHODS for seed in (1, 2)]
        assert all(episode_ids == ids[0] for episode_ids in ids)

    # logreg's metrics.json states the logistic regression it fitted
    logreg_metrics = json.loads((workdir / "results/digits/resnet12/seed1/logreg/5shot/metrics.json").read_text())
    assert logreg_metrics["method"] == "logreg" and logreg_metrics["learner_settings"]["C"] == 1.0


@pytest.mark.slow
def test_report_front_page_shows_the_summary_and_verdicts(tiny_two_seeds, tmp_path):
    report = tmp_path / "report.html"  # outside the shared run's folder, which tests only read
    run_snakemake(tiny_two_seeds.workdir, None, "--report", str(report),
                  "--configfile", str(tiny_two_seeds.workdir / "config.yaml"))  # its config, as written
    html = report.read_text()
    assert len(html) > 10_000 and "Verdicts" in html and "mtl vs ft, digits 3-way 5-shot" in html


@pytest.mark.slow
def test_a_seed_gives_the_same_numbers_alone_and_on_any_core_count(tiny_two_seeds, tiny_seed_two_alone):
    """Seed 2 alone, one job at a time (--cores 1), reproduces its rows of the two-seed run (--cores 2:
    two jobs at a time) exactly, and its trained weights bit for bit."""
    with_others = pd.read_csv(tiny_two_seeds.workdir / "results/summary_per_seed.csv")
    with_others = with_others[with_others["seed"] == 2].reset_index(drop=True)
    by_itself = pd.read_csv(tiny_seed_two_alone.workdir / "results/summary_per_seed.csv")
    pd.testing.assert_frame_equal(by_itself[NUMBERS], with_others[NUMBERS])
    pd.testing.assert_frame_equal(by_itself, with_others)  # every column of a per-seed row, not only the numbers
    run = "results/digits/resnet12/seed2"
    for trained in [f"{run}/pretrain/encoder.pt"] + [f"{run}/{m}/{k}shot/model.pt" for m in ("mtl", "mtl_ht")
                                                    for k in (1, 5)]:
        alone, together = (torch.load(root / trained, weights_only=True)["state_dict"]
                           for root in (tiny_seed_two_alone.workdir, tiny_two_seeds.workdir))
        assert alone.keys() == together.keys() and all(torch.equal(alone[k], together[k]) for k in alone), trained

    one_seed = pd.read_csv(tiny_seed_two_alone.workdir / "results/summary.csv")
    assert (one_seed["interval"] == "training variance not measured (1 seed)").all()
    assert one_seed["ci95"].isna().all()
    text = (tiny_seed_two_alone.workdir / "results/summary.md").read_text()
    assert "training variance not measured, so no verdict" in text


def test_dry_run_of_the_default_config_lists_a_training_chain_per_seed(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["protocol"]["seeds"] == [1, 2, 3]
    counts = job_counts(run_snakemake(tmp_path, config, "-n").stdout)
    datasets = [name for name, entry in config["data"].items() if entry["enabled"]]
    assert counts["pretrain"] == 3 * len(datasets) == 6
    assert counts["meta_train"] == 3 * len(datasets) * 2 * 2  # seeds x datasets x (mtl, mtl_ht) x shots
    assert counts["evaluate"] == 3 * len(datasets) * 5 * 2  # seeds x datasets x (ft, logreg, proto, mtl, mtl_ht) x shots
    assert counts["episodes"] == len(datasets) * 2

    # seeds from the command line, as a user overrides them (nested values arrive as strings)
    override = job_counts(run_snakemake(tmp_path, config, "-n", "--config", "protocol={seeds: [4, 5]}").stdout)
    assert override["pretrain"] == 2 * len(datasets)


# ----------------------------------------------------------------------------- transfer
#: The test-only folder: 12 of scikit-learn's 8x8 digits of each of these classes, as 8-bit PNGs.
TRANSFER_DIGITS = {"two": 2, "five": 5, "eight": 8, "nine": 9}


def write_digit_folder(root):
    """``root/<class>/<index>.png``: a user's own folder of images, one sub-folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in TRANSFER_DIGITS.items():
        (root / name).mkdir(parents=True)
        for index in np.flatnonzero(digits.target == digit)[:12]:
            grey = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(grey).save(root / name / f"{index:04d}.png")


def with_transfer(config):
    """The tiny config plus tests/workflow/transfer/config.yaml (its datasets added to tiny's)."""
    layer = yaml.safe_load((SCENARIOS / "transfer" / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["data"].update(layer["data"])
    config["transfer"] = layer["transfer"]
    return config


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, tiny_two_seeds):
    """A copy of tiny_two_seeds with a test-only folder added and scored with the models trained on
    digits: what a user does who adds `transfer` to a finished run."""
    workdir = tiny_two_seeds.copy_to(tmp_path_factory.mktemp("transfer") / "run").workdir
    write_digit_folder(workdir / "my_digits")
    result = run_snakemake(workdir, with_transfer(tiny_two_seeds.config), "all", timeout=1800)
    return workdir, job_counts(result.stdout + result.stderr)


@pytest.mark.slow
def test_transfer_rows_score_the_digits_models_on_a_test_only_folder(transfer_run):
    workdir, counts = transfer_run
    assert counts["build_test_hdf5"] == 1 and counts["evaluate_transfer"] == 20, counts
    assert counts["download"] == 1 and counts["episodes"] == 2  # my_digits' (digits' are the finished run's)
    # No in-domain job reran (digits' download neither, or its split would be rebuilt): their params,
    # inputs and code are those of the run without transfer, so a run with transfer from scratch
    # trains and scores them as it did.
    assert not IN_DOMAIN_RULES & counts.keys() and counts["summarize"] == 1, counts
    assert sorted(p.name for p in (workdir / "data/my_digits").iterdir()) == ["test.h5"]
    assert HDF5Split(workdir / "data/my_digits/test.h5").image_shape == (16, 16, 3)  # backbone.image_size
    assert not (workdir / "results/my_digits/resnet12").exists()  # never trained

    summary = pd.read_csv(workdir / "results/summary.csv")
    assert list(summary.columns[:2]) == ["trained_on", "dataset"]
    transfer = summary[summary["trained_on"] != summary["dataset"]]
    assert len(transfer) == 10 and (transfer["trained_on"] == "digits").all() and (transfer["dataset"] == "my_digits").all()
    assert sorted(transfer["method"].unique()) == sorted(METHODS) and sorted(transfer["shot"].unique()) == [1, 5]
    assert (transfer["n_seeds"] == 2).all() and (transfer["seeds"] == "1 2").all()
    assert (transfer["interval"] == SEED_INTERVAL).all() and transfer["ci95"].notna().all()
    others = transfer[transfer["method"] != "ft"]
    assert others["diff_vs_ft"].notna().all() and others["diff_vs_ft_ci95"].notna().all()
    assert (others["seeds_above_ft"] + others["seeds_below_ft"] <= 2).all()
    assert transfer["reference_accuracy"].isna().all()

    per_seed = pd.read_csv(workdir / "results/summary_per_seed.csv")
    moved = per_seed[per_seed["dataset"] == "my_digits"].set_index(["method", "shot", "seed"]).sort_index()
    for row in others.itertuples():  # the across-seed difference is the mean of the per-seed ones
        assert row.diff_vs_ft == pytest.approx(moved.loc[(row.method, row.shot), "diff_vs_ft"].mean(), abs=0.011)
    assert_summary_matches_per_seed(summary, per_seed)  # every row, in-domain and transfer

    text = (workdir / "results/summary.md").read_text()
    assert text.splitlines()[[i for i, line in enumerate(text.splitlines()) if line.startswith("|")][0]].startswith(
        "| trained on | dataset |")
    assert sum(line.startswith("- mtl vs ft, trained on digits, tested on my_digits 3-way 5-shot: ")
               for line in text.splitlines()) == 1
    assert sum(line.startswith("- mtl vs ft, digits 3-way 5-shot: ") for line in text.splitlines()) == 1


@pytest.mark.slow
def test_transfer_scored_every_method_and_seed_on_the_same_target_episodes(transfer_run):
    workdir, _ = transfer_run
    for shot in (1, 5):
        runs = [workdir / f"results/digits/resnet12/seed{seed}/{m}/{shot}shot/on_my_digits" for m in METHODS
                for seed in (1, 2)]
        ids = [pd.read_csv(run / "episodes.csv")["episode"].tolist() for run in runs]
        assert len(ids[0]) == 20 and all(episode_ids == ids[0] for episode_ids in ids)
        metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
        assert {(m["trained_on"], m["dataset"]) for m in metrics} == {("digits", "my_digits")}
        assert {m["episodes_file"] for m in metrics} == {f"results/my_digits/episodes/3way{shot}shot.npz"}
        assert len({m["episodes_sha256"] for m in metrics}) == 1
        # the in-domain runs record trained_on too
        own = json.loads((workdir / f"results/digits/resnet12/seed1/mtl/{shot}shot/metrics.json").read_text())
        assert (own["trained_on"], own["dataset"]) == ("digits", "digits")


@pytest.mark.slow
def test_transfer_leaves_the_in_domain_numbers_as_they_were(transfer_run, tiny_two_seeds):
    """The digits rows of the transfer run equal those of the same configuration without transfer."""
    for name, keys in (("summary_per_seed.csv", ["method", "shot", "seed"]), ("summary.csv", ["method", "shot"])):
        with_transfer_rows = pd.read_csv(transfer_run[0] / "results" / name)
        in_domain = with_transfer_rows[with_transfer_rows["dataset"] == "digits"].reset_index(drop=True)
        without = pd.read_csv(tiny_two_seeds.workdir / "results" / name)
        assert len(in_domain) == len(without) > 0 and (without["trained_on"] == "digits").all()
        pd.testing.assert_frame_equal(in_domain, without)
        assert in_domain[keys + NUMBERS].equals(without[keys + NUMBERS])
