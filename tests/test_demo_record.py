"""The demo's numbers in the README and the docs are generated from one recorded run
(tests/demo_record.py), and CI's check of a fresh demo against that record can fail."""
from __future__ import annotations

import copy

import pandas as pd
import pytest

from tests import demo_record
from tests.demo_record import (
    RENDERERS,
    compare_fresh_run,
    load_record,
    read_run,
    render_prediction,
    render_seeds,
    render_table,
    stale_blocks,
)

#: Where each generated block must be: a page that lost its block would silently stop being checked.
REQUIRED_BLOCKS = {"README.md": {"run", "table", "prediction"}, "docs/results.md": {"calibration", "seeds"},
                   "docs/prediction.md": {"prediction"}}


def test_every_demo_block_of_the_pages_is_the_rendering_of_the_record():
    record = load_record()
    for page, names in REQUIRED_BLOCKS.items():
        assert names <= demo_record.blocks((demo_record.REPO / page).read_text()).keys(), page
    assert stale_blocks(record) == [], "run: python -m tests.demo_record --update"


def test_a_changed_number_makes_the_blocks_that_show_it_stale():
    record = copy.deepcopy(load_record())
    record["per_seed"][0]["accuracy"] += 0.01
    record["prediction"]["correct"] -= 1
    stale = stale_blocks(record)
    assert "README.md: demo:table" in stale and "README.md: demo:prediction" in stale
    assert "docs/prediction.md: demo:prediction" in stale and "README.md: demo:run" not in stale


def summary_row(method, shot, accuracy, ci95, diff=None, diff_ci95=None, above=None, paired=None, verdict=None):
    return {"trained_on": "digits", "dataset": "digits", "backbone": "resnet12", "method": method, "way": 3,
            "shot": shot, "query": 15, "n_seeds": 2, "accuracy": accuracy, "ci95": ci95, "diff_vs_ft": diff,
            "diff_vs_ft_ci95": diff_ci95, "seeds_above_ft": above, "seeds_paired_with_ft": paired, "verdict": verdict}


def per_seed_row(method, shot, seed, accuracy, diff=None, diff_ci95=None):
    return {"method": method, "shot": shot, "seed": seed, "accuracy": accuracy, "diff_vs_ft": diff,
            "diff_vs_ft_ci95": diff_ci95}


SMALL = {
    "summary": [summary_row("ft", 1, 60.0, 5.0),
                summary_row("proto", 1, 62.5, 6.0, 2.5, 3.1, 2, 2, "no detectable difference")],
    "per_seed": [per_seed_row("ft", 1, 1, 58.0), per_seed_row("ft", 1, 2, 62.0),
                 per_seed_row("proto", 1, 1, 62.0, 4.0, 1.0), per_seed_row("proto", 1, 2, 63.0, 1.0, 2.0)],
}


def test_the_table_puts_each_seed_and_the_summary_in_their_columns():
    lines = render_table(SMALL).splitlines()
    assert lines[2] == "| 1 | ft | 58.00, 62.00 | 60.00 ± 5.00 |  |  |"
    assert lines[3] == "| 1 | proto | 62.00, 63.00 | 62.50 ± 6.00 | +2.50 ± 3.10 | 2 of 2 |"
    assert lines[-1].startswith("- proto vs ft, digits 3-way 1-shot: +2.50 ± 3.10 points over 2 seeds")


def test_the_seeds_paragraph_names_the_single_seed_that_looks_most_decisive():
    # seed 1: 4.0 +- 1.0 (4x its half-width), seed 2: 1.0 +- 2.0 (inside it)
    text = render_seeds(SMALL)
    assert "seed 1 alone puts proto 4.00 ± 1.00 points above ft in 1-shot" in text
    assert "+1.00 (seed 2)" in text and '"no detectable difference" (+2.50 ± 3.10 points)' in text


def write_demo_outputs(folder, summary, per_seed, predicted, truth, agreeing, probability):
    """A demo's results folder: the summaries, the worked example's predictions, truth and log."""
    results = folder / "results"
    (results / "predictions").mkdir(parents=True)
    (results / "image_folders/digits").mkdir(parents=True)
    (folder / "logs/predict").mkdir(parents=True)
    pd.DataFrame(summary).to_csv(results / "summary.csv", index=False)
    pd.DataFrame(per_seed).to_csv(results / "summary_per_seed.csv", index=False)
    files = [f"{i:04d}.png" for i in range(len(truth))]
    pd.DataFrame({"file": files, "class": truth}).to_csv(results / "image_folders/digits/query_truth.csv", index=False)
    pd.DataFrame({"file": files[::-1], "predicted": predicted[::-1], "probability": probability[::-1],
                  "seeds_agreeing": agreeing[::-1], "seeds": 3}).to_csv(results / "predictions/digits.csv", index=False)
    (folder / "logs/predict/digits.log").write_text(
        "2026-12-06 INFO mtl.predict: predicting with proto 1-shot: the best across-seed accuracy ...\n")


@pytest.fixture
def fresh_demo(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_record, "RECORD", tmp_path / "record.json")
    folder = tmp_path / "run"
    # 6 queries, 4 right (rows 0, 1, 3, 5); the CSV lists them in another order than the truth file
    write_demo_outputs(folder, SMALL["summary"], SMALL["per_seed"], predicted=[7, 8, 7, 9, 8, 9],
                       truth=[7, 8, 9, 9, 7, 9], agreeing=[3, 3, 2, 3, 1, 2],
                       probability=[0.9, 0.8, 0.6, 0.7, 0.5, 0.6])
    return folder


def test_the_record_scores_the_worked_example_against_the_truth_file(fresh_demo):
    prediction = read_run(fresh_demo)["prediction"]
    assert (prediction["correct"], prediction["total"], prediction["way"]) == (4, 6, 3)
    assert (prediction["method"], prediction["shot"], prediction["seeds"]) == ("proto", 1, 3)
    assert prediction["seeds_agreeing"] == {"3": 3, "2": 2, "1": 1}
    assert prediction["probability_right"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)
    assert prediction["probability_wrong"] == pytest.approx((0.6 + 0.5) / 2)
    assert render_prediction({"prediction": prediction}).startswith(
        "In the recorded demo run it chose `proto` 1-shot and classified 4 of 6 query images correctly (66.7%")


def test_check_passes_a_reproduced_demo_and_fails_a_moved_one_on_the_records_machine(fresh_demo, monkeypatch):
    demo_record.write_record(600.0, 1100.0, fresh_demo)
    assert compare_fresh_run(fresh_demo) == (True, [])
    assert demo_record.main(["--check", "--folder", str(fresh_demo)]) == 0

    per_seed = pd.read_csv(fresh_demo / "results/summary_per_seed.csv")
    per_seed.loc[0, "accuracy"] = 58.01
    per_seed.to_csv(fresh_demo / "results/summary_per_seed.csv", index=False)
    same_kind, differences = compare_fresh_run(fresh_demo)
    assert same_kind and [d.splitlines()[0] for d in differences] == ["demo:table differs:"]
    assert demo_record.main(["--check", "--folder", str(fresh_demo)]) == 1

    # on another CPU generation the numbers may differ by rounding: reported, not failed
    here = demo_record.machine()
    monkeypatch.setattr(demo_record, "machine", lambda: {**here, "cpu_generation": "family 23 model 49"})
    assert demo_record.main(["--check", "--folder", str(fresh_demo)]) == 0


def test_every_renderer_reads_a_full_record():
    record = load_record()
    for name, render in RENDERERS.items():
        assert render(record).endswith("\n"), name
