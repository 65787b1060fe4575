"""The ablation table's maths on a hand example: means and t-intervals over seeds, paired
differences to ft and to mtl per seed on the same episodes, the paper column, and its refusals."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from mtl.ablation import write_ablation
from mtl.errors import ConfigError
from mtl.published import PAPER_ABLATION
from mtl.results.runs import write_episode_results

T_975_1DOF = 12.706204736174698  # Student t quantile 0.975 with 1 degree of freedom (two seeds)
SHA = "a" * 64
#: Per-episode accuracies (fractions) per arm and seed; 4 shared episodes. Means in %:
#: ft 50 / 60, logreg 55 / 55, mtl 60 / 70, mtl_last 55 / 75.
EPISODES = {
    ("ft", 1): [0.4, 0.6, 0.5, 0.5], ("ft", 2): [0.6, 0.6, 0.5, 0.7],
    ("logreg", 1): [0.5, 0.6, 0.6, 0.5], ("logreg", 2): [0.5, 0.6, 0.5, 0.6],
    ("mtl", 1): [0.6, 0.7, 0.6, 0.5], ("mtl", 2): [0.7, 0.7, 0.6, 0.8],
    ("mtl_last", 1): [0.5, 0.6, 0.6, 0.5], ("mtl_last", 2): [0.8, 0.7, 0.7, 0.8],
}


def write_runs(folder, episodes=EPISODES, *, dataset="miniimagenet", way=5, sha=lambda arm, seed: SHA, trained_on=None):
    pairs = []
    for (arm, seed), accuracies in episodes.items():
        protocol = {"dataset": dataset, "backbone": "resnet12", "method": arm, "seed": seed, "way": way, "shot": 1,
                    "query": 15, "episode_seed": 1, "episodes_file": "episodes.npz", "episodes_sha256": sha(arm, seed)}
        if trained_on is not None:
            protocol["trained_on"] = trained_on
        name = f"{arm}_{seed}" if trained_on is None else f"{trained_on}_on_{dataset}_{arm}_{seed}"
        csv, json_ = folder / f"{name}.csv", folder / f"{name}.json"
        write_episode_results(csv, json_, accuracies, protocol)
        pairs.append((json_, csv))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def build(folder, **kwargs):
    metrics, episodes = write_runs(folder, **kwargs)
    wide = write_ablation(metrics, episodes, csv_out=folder / "ablation.csv", md_out=folder / "ablation.md")
    return wide.set_index("arm"), pd.read_csv(folder / "ablation.csv").set_index("arm")


def test_hand_example(tmp_path):
    wide, csv = build(tmp_path)
    cell = "miniimagenet_1shot_"
    assert list(wide.index) == ["ft", "logreg", "mtl", "mtl_last"]  # registry order
    last = wide.loc["mtl_last"]
    # mean of 55 and 75; sd sqrt(200) = 14.142; half-width t * sd / sqrt(2) = t * 10
    assert last[cell + "accuracy"] == pytest.approx(65.0)
    assert last[cell + "ci95"] == pytest.approx(T_975_1DOF * 10.0)
    # vs ft: per seed +5 and +15 -> +10, sd 7.071, half-width t * 5; both seeds above
    assert last[cell + "diff_vs_ft"] == pytest.approx(10.0)
    assert last[cell + "diff_vs_ft_ci95"] == pytest.approx(T_975_1DOF * 5.0)
    assert last[cell + "seeds_above_ft"] == 2
    # vs mtl: per seed -5 and +5 -> 0, half-width t * 5; one seed above
    assert last[cell + "diff_vs_mtl"] == pytest.approx(0.0, abs=1e-9)
    assert last[cell + "diff_vs_mtl_ci95"] == pytest.approx(T_975_1DOF * 5.0)
    assert last[cell + "seeds_above_mtl"] == 1
    # a baseline has no difference to itself; mtl vs ft: +10 on both seeds, sd 0
    assert math.isnan(wide.loc["ft", cell + "diff_vs_ft"]) and math.isnan(wide.loc["mtl", cell + "diff_vs_mtl"])
    assert wide.loc["mtl", cell + "diff_vs_ft"] == pytest.approx(10.0)
    assert wide.loc["mtl", cell + "diff_vs_ft_ci95"] == pytest.approx(0.0, abs=1e-9)
    # logreg vs ft: +5 and -5 -> 0 (one seed above); vs mtl: -5 and -15 -> -10
    assert wide.loc["logreg", cell + "diff_vs_ft"] == pytest.approx(0.0, abs=1e-9)
    assert wide.loc["logreg", cell + "seeds_above_ft"] == 1
    assert wide.loc["logreg", cell + "diff_vs_mtl"] == pytest.approx(-10.0)
    assert "Tian et al. 2020" in wide.loc["logreg", "what"]
    # the CSV holds the same numbers, rounded to 2 decimals
    assert csv.loc["mtl_last", cell + "ci95"] == pytest.approx(127.06)
    assert csv.loc["mtl_last", cell + "n_seeds"] == 2


def test_paper_figures_appear_only_where_the_paper_reports_the_arm(tmp_path):
    wide, _ = build(tmp_path)
    cell = "miniimagenet_1shot_"
    assert wide.loc["ft", cell + "paper_accuracy"] == PAPER_ABLATION["ft"][("miniimagenet", 1)][0] == 55.9
    assert "Table 1" in wide.loc["ft", cell + "paper_source"] and "issue #24" in wide.loc["ft", cell + "paper_source"]
    assert wide.loc["mtl", cell + "paper_accuracy"] == 60.2  # the published MTL (no HT) figure
    assert math.isnan(wide.loc["mtl_last", cell + "paper_accuracy"])  # not verified: left empty
    text = (tmp_path / "ablation.md").read_text()
    assert "(paper 55.9 [1])" in text and "[1] Sun et al., CVPR 2019, Table 1" in text
    for title in ("## Accuracy (%)", "## Difference to ft (points)", "## Difference to mtl (points)"):
        assert title in text
    assert "| `mtl_last` | 65.00 ± 127.06 |" in text and "| `mtl_last` | +10.00 ± 63.53 (2/2) |" in text


def test_no_paper_figure_for_other_protocols(tmp_path):
    wide, _ = build(tmp_path, dataset="digits", way=3)
    assert wide.filter(like="paper_accuracy").isna().all().all()
    assert "No published figure" in (tmp_path / "ablation.md").read_text()


def test_refuses_arms_scored_on_other_episodes(tmp_path):
    with pytest.raises(ConfigError, match="episodes_sha256"):
        build(tmp_path, sha=lambda arm, seed: "b" * 64 if arm == "mtl_last" else SHA)


def test_refuses_a_table_without_its_baselines(tmp_path):
    without_mtl = {key: value for key, value in EPISODES.items() if key[0] != "mtl"}
    with pytest.raises(ConfigError, match="mtl"):
        build(tmp_path, episodes=without_mtl)


def test_transfer_runs_get_their_own_columns_paired_within_their_source(tmp_path):
    """fc100's own runs and miniimagenet's models scored on fc100 share fc100's episodes, never a column."""
    in_domain = write_runs(tmp_path, dataset="fc100")
    # trained on miniimagenet, tested on fc100: every arm 10 points lower than fc100's own, except
    # ft, 20 points lower: pairing with fc100's own ft would give other differences
    shifted = {key: [a - (0.2 if key[0] == "ft" else 0.1) for a in acc] for key, acc in EPISODES.items()}
    transfer = write_runs(tmp_path, shifted, dataset="fc100", trained_on="miniimagenet")
    wide = write_ablation(in_domain[0] + transfer[0], in_domain[1] + transfer[1], csv_out=tmp_path / "a.csv",
                          md_out=tmp_path / "a.md").set_index("arm")
    own, moved = "fc100_1shot_", "miniimagenet_to_fc100_1shot_"
    groups = [c[: -len("accuracy")] for c in wide.columns if c.endswith("shot_accuracy")]
    assert groups == [own, moved]  # in-domain first
    assert wide.loc["mtl_last", own + "accuracy"] == pytest.approx(65.0)
    assert wide.loc["mtl_last", moved + "accuracy"] == pytest.approx(55.0)
    assert wide.loc["mtl_last", own + "diff_vs_ft"] == pytest.approx(10.0)
    assert wide.loc["mtl_last", moved + "diff_vs_ft"] == pytest.approx(20.0)  # vs ft trained on miniimagenet
    assert wide.loc["mtl_last", moved + "diff_vs_mtl"] == pytest.approx(0.0, abs=1e-9)
    # fc100 1-shot has a published mtl figure; the models trained on miniimagenet do not
    assert wide.loc["mtl", own + "paper_accuracy"] == 43.6 and math.isnan(wide.loc["mtl", moved + "paper_accuracy"])
    assert "miniimagenet to fc100 1shot" in (tmp_path / "a.md").read_text()


def test_k_of_n_counts_the_seeds_paired_with_each_baseline(tmp_path):
    """mtl_last ran a third seed that ft and mtl did not: its differences pair seeds 1 and 2 only, and
    '(k/n)' says so (n = 2, not the arm's 3 seeds)."""
    wide, csv = build(tmp_path, episodes={**EPISODES, ("mtl_last", 3): [0.5, 0.5, 0.5, 0.5]})
    cell = "miniimagenet_1shot_"
    last = wide.loc["mtl_last"]
    assert last[cell + "n_seeds"] == 3 and last[cell + "accuracy"] == pytest.approx((55 + 75 + 50) / 3)
    assert last[cell + "diff_vs_ft"] == pytest.approx(10.0)  # +5, +15 on the paired seeds 1 and 2
    assert (last[cell + "seeds_paired_with_ft"], last[cell + "seeds_above_ft"]) == (2, 2)
    assert (last[cell + "seeds_paired_with_mtl"], last[cell + "seeds_above_mtl"]) == (2, 1)
    assert csv.loc["mtl_last", cell + "seeds_paired_with_ft"] == 2 and csv.loc["logreg", cell + "seeds_paired_with_mtl"] == 2
    assert pd.isna(csv.loc["ft", cell + "seeds_paired_with_ft"])
    text = (tmp_path / "ablation.md").read_text()
    assert f"| `mtl_last` | +10.00 ± {T_975_1DOF * 5:.2f} (2/2) |" in text
    assert f"| `mtl_last` | +0.00 ± {T_975_1DOF * 5:.2f} (1/2) |" in text
    assert "/3)" not in text
