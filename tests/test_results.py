"""mtl.results: interval formula, paired differences, the summary table and its files, report plots."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

from mtl.errors import ConfigError, DataError, MTLError
from mtl.results import (
    INTERVAL_FORMULA,
    build_summary,
    ci95,
    paired_difference,
    plot_accuracies,
    plot_histories,
    summarize_accuracies,
    write_episode_results,
    write_summary,
)

METHODS = ["ft", "proto", "mtl", "mtl_ht"]
N_EPISODES = 40


def _protocol(method, shot, *, dataset="miniimagenet", way=5, seed=1, sha=None):
    return {
        "dataset": dataset, "backbone": "resnet12", "method": method, "way": way, "shot": shot,
        "query": 15, "seed": seed, "episodes_file": f"results/{dataset}/episodes/{way}way{shot}shot.npz",
        "episodes_sha256": sha or f"sha-{dataset}-{way}-{shot}",
    }


def _write_run(root, method, shot, accuracies, **protocol_overrides):
    """A fake evaluated run, written by the real writer at the pipeline's paths."""
    protocol = _protocol(method, shot, **protocol_overrides)
    run_dir = root / protocol["dataset"] / "resnet12" / method / f"{shot}shot"
    csv, js = run_dir / "episodes.csv", run_dir / "metrics.json"
    write_episode_results(csv, js, accuracies, protocol)
    return js, csv


def _accuracies(seed, offset=0.0):
    """Per-episode fractions that are multiples of 1/75 (5-way x 15 queries), like real ones."""
    rng = np.random.default_rng(seed)
    correct = np.clip(rng.integers(20, 60, N_EPISODES) + round(offset * 75), 0, 75)
    return correct / 75.0


@pytest.fixture
def tree(tmp_path):
    """4 methods x 2 shots on miniimagenet; each method a fixed shift above ft on every episode."""
    runs = []
    for shot in (1, 5):
        base = _accuracies(shot)
        for k, method in enumerate(METHODS):
            shifted = np.clip(base + k * 4 / 75, 0, 1)
            runs.append(_write_run(tmp_path, method, shot, shifted))
    return tmp_path, runs


# ----------------------------------------------------------------------------- statistics
def test_ci95_matches_hand_computation():
    # [0, 1, 0, 1]: population std 0.5, n 4 -> 1.96 * 0.5 / 2 = 0.49
    assert ci95([0, 1, 0, 1]) == pytest.approx(0.49)
    # [2, 4, 4, 4, 5, 5, 7, 9]: the textbook population std of 2, n 8
    assert ci95([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(1.96 * 2 / math.sqrt(8))
    assert ci95([0.7] * 10) == 0.0


def test_ci95_refuses_empty_and_nan():
    with pytest.raises(MTLError, match="non-empty"):
        ci95([])
    with pytest.raises(MTLError, match="NaN"):
        ci95([0.5, float("nan")])


def test_summarize_accuracies_reports_percent():
    summary = summarize_accuracies([0.0, 1.0, 0.0, 1.0])
    assert summary == {"accuracy": 50.0, "ci95": pytest.approx(49.0), "std": 50.0, "n": 4}


def test_summarize_refuses_percentages():
    with pytest.raises(MTLError, match="fractions"):
        summarize_accuracies([55.0, 60.0])


def test_paired_difference_identical_runs_is_zero():
    acc = _accuracies(3)
    assert paired_difference(acc, acc) == (0.0, 0.0)


def test_paired_difference_constant_shift_has_zero_interval():
    acc = _accuracies(3) * 0.8
    diff, interval = paired_difference(acc + 0.05, acc)
    assert diff == pytest.approx(5.0)
    assert interval == pytest.approx(0.0, abs=1e-9)


def test_paired_difference_matches_ci95_of_differences():
    a, b = np.array([0.6, 0.8, 0.4, 0.9]), np.array([0.5, 0.8, 0.2, 0.7])
    diff, interval = paired_difference(a, b)
    assert diff == pytest.approx(12.5)
    assert interval == pytest.approx(ci95([10.0, 0.0, 20.0, 20.0]))


def test_paired_difference_needs_same_episode_count():
    with pytest.raises(MTLError, match="same episodes"):
        paired_difference([0.5, 0.6], [0.5, 0.6, 0.7])


# ----------------------------------------------------------------------------- per-run files
def test_write_episode_results_writes_both_files(tmp_path):
    acc = np.array([0.0, 1.0, 0.0, 1.0])
    js, csv = _write_run(tmp_path, "mtl", 1, acc)
    episodes = pd.read_csv(csv)
    assert list(episodes.columns) == ["episode", "accuracy"]
    assert episodes["episode"].tolist() == [0, 1, 2, 3]
    metrics = json.loads(js.read_text())
    assert metrics["episodes"] == 4 and metrics["interval"] == INTERVAL_FORMULA
    assert metrics["accuracy"] == 50.0 and metrics["ci95"] == pytest.approx(49.0) and metrics["std"] == 50.0
    assert metrics["episodes_sha256"] == "sha-miniimagenet-5-1"
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_episode_results_names_missing_protocol_keys(tmp_path):
    protocol = _protocol("mtl", 1)
    del protocol["episodes_sha256"]
    with pytest.raises(ConfigError, match="episodes_sha256"):
        write_episode_results(tmp_path / "e.csv", tmp_path / "m.json", [0.5], protocol)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- summary
def test_build_summary_rows_order_and_diffs(tree):
    _, runs = tree
    table = build_summary(list(reversed(runs)))
    assert len(table) == 8
    assert table["shot"].tolist() == [1, 1, 1, 1, 5, 5, 5, 5]
    assert table["method"].tolist() == METHODS * 2
    assert set(table["interval"]) == {INTERVAL_FORMULA}
    assert table.loc[table["method"] == "ft", "diff_vs_ft"].isna().all()
    others = table[table["method"] != "ft"]
    # each method is ft shifted by k * 4/75 on every episode (few clipped): positive, ordered diffs
    assert (others["diff_vs_ft"] > 0).all()
    assert others.groupby("shot")["diff_vs_ft"].apply(lambda d: d.is_monotonic_increasing).all()
    proto_1 = table[(table["method"] == "proto") & (table["shot"] == 1)].iloc[0]
    ft_1 = table[(table["method"] == "ft") & (table["shot"] == 1)].iloc[0]
    assert proto_1["diff_vs_ft"] == pytest.approx(proto_1["accuracy"] - ft_1["accuracy"])


def test_build_summary_reference_only_for_mtl_methods_on_5way(tree):
    table = build_summary(tree[1])
    with_reference = table[table["reference_accuracy"].notna()]
    assert set(with_reference["method"]) == {"mtl", "mtl_ht"}
    row = table[(table["method"] == "mtl_ht") & (table["shot"] == 5)].iloc[0]
    assert (row["reference_accuracy"], row["reference_ci95"]) == (75.5, 0.8)
    assert "MTL+HT" in row["reference_source"] and "queries per class = shot" in row["reference_source"]
    assert (table.loc[table["reference_accuracy"].isna(), "reference_source"] == "").all()


def test_build_summary_no_reference_for_other_ways(tmp_path):
    runs = [_write_run(tmp_path, "mtl", 1, _accuracies(1), way=10)]
    assert build_summary(runs)["reference_accuracy"].isna().all()


def test_build_summary_without_baseline_leaves_diff_empty(tmp_path):
    runs = [_write_run(tmp_path, m, 1, _accuracies(1)) for m in ("proto", "mtl")]
    assert build_summary(runs)["diff_vs_ft"].isna().all()


def test_build_summary_refuses_mismatched_protocol(tmp_path):
    ft = _write_run(tmp_path, "ft", 1, _accuracies(1))
    mtl = _write_run(tmp_path, "mtl", 1, _accuracies(1), seed=2, sha="other-episodes")
    with pytest.raises(ConfigError) as error:
        build_summary([ft, mtl])
    message = str(error.value)
    assert str(ft[0]) in message and str(mtl[0]) in message
    assert "seed" in message and "episodes_sha256" in message and "query" not in message


def test_build_summary_refuses_duplicates(tree):
    _, runs = tree
    with pytest.raises(ConfigError, match="two runs"):
        build_summary(runs + [runs[0]])


def test_build_summary_refuses_stale_file_pair(tree):
    _, runs = tree
    mixed = (runs[0][0], runs[4][1])  # 1-shot metrics with 5-shot episodes
    with pytest.raises(DataError, match="different evaluations"):
        build_summary([mixed])


def test_write_summary_files(tree, tmp_path):
    table = build_summary(tree[1])
    csv, md = tmp_path / "out" / "summary.csv", tmp_path / "out" / "summary.md"
    write_summary(table, csv, md)
    written = pd.read_csv(csv)
    assert len(written) == 8 and list(written.columns) == list(table.columns)
    assert (written["accuracy"] == written["accuracy"].round(2)).all()
    assert written.loc[written["method"] == "ft", "diff_vs_ft"].isna().all()
    text = md.read_text()
    assert INTERVAL_FORMULA in text and "paired" in text
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 8
    assert table_lines[0].startswith("| dataset | backbone | shot | method")
    assert "75.5 ± 0.8 [" in text and "[1] MTL paper (no HT)" in text


# ----------------------------------------------------------------------------- plots
def test_plot_accuracies_writes_png(tree, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_accuracies(build_summary(tree[1]), tmp_path / "plots" / "accuracy.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_histories_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    epochs = np.arange(1, 6)
    pd.DataFrame({"epoch": epochs, "train_loss": 2.0 / epochs, "val_acc": 0.4 + 0.02 * epochs,
                  "val_ci95": 0.01}).to_csv(tmp_path / "pretrain.csv", index=False)
    pd.DataFrame({"epoch": epochs, "meta_loss": 1.0 / epochs, "val_acc": 50 + epochs,
                  "val_ci95": 0.8}).to_csv(tmp_path / "meta.csv", index=False)
    path = plot_histories({"pretrain": tmp_path / "pretrain.csv", "mtl 1-shot": tmp_path / "meta.csv"},
                          tmp_path / "history.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_histories_names_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing.csv"):
        plot_histories({"run": tmp_path / "missing.csv"}, tmp_path / "h.png")


def test_plots_without_matplotlib_say_what_to_install(tree, tmp_path, monkeypatch):
    table = build_summary(tree[1])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MTLError, match="install"):
        plot_accuracies(table, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_history_labels_name_dataset_method_and_shot():
    from mtl.results import history_label

    assert history_label("results/fc100/resnet12/pretrain/history.csv") == "fc100 pretrain"
    assert history_label("results/fc100/resnet12/mtl_ht/5shot/history.csv") == "fc100 mtl_ht 5shot"
