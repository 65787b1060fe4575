"""mtl.stats, mtl.results, mtl.plots and mtl.report: interval formulas, paired differences, the
across-seed summary, verdicts, the summary files, the report plots and the summarize step."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl.errors import ConfigError, DataError, MTLError
from mtl.plots import history_run, plot_accuracies, plot_histories
from mtl.report import summarize_runs
from mtl.results import (
    build_summary,
    load_runs,
    per_seed_table,
    summary_markdown,
    summary_rst,
    verdict_sentences,
    write_episode_results,
    write_summary,
)
from mtl.results.tables import pooled_reliability
from mtl.stats import (
    INTERVAL_FORMULA,
    NOT_MEASURED,
    SEED_INTERVAL,
    ci95,
    paired_difference,
    summarize_accuracies,
    t_interval,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ft", "proto", "mtl", "mtl_ht"]
N_EPISODES = 40


def _protocol(method, shot, *, dataset="miniimagenet", way=5, seed=1, episode_seed=1, sha=None, trained_on=None):
    transfer = {"trained_on": trained_on} if trained_on is not None else {}
    return {
        **transfer,
        "dataset": dataset, "backbone": "resnet12", "method": method, "seed": seed, "way": way, "shot": shot,
        "query": 15, "episode_seed": episode_seed,
        "episodes_file": f"results/{dataset}/episodes/{way}way{shot}shot.npz",
        "episodes_sha256": sha or f"sha-{dataset}-{way}-{shot}",
    }


def _write_run(root, method, shot, accuracies, calibration=None, **protocol_overrides):
    """A fake evaluated run, written by the real writer at the pipeline's paths; ``calibration``: the
    keys evaluate adds to its metrics.json (temperature, ece, nll, ..., reliability), if any."""
    protocol = {**_protocol(method, shot, **protocol_overrides), **(calibration or {})}
    trained_on = protocol.get("trained_on", protocol["dataset"])
    run_dir = root / trained_on / "resnet12" / f"seed{protocol['seed']}" / method / f"{shot}shot"
    if trained_on != protocol["dataset"]:  # where evaluate_transfer writes it
        run_dir = run_dir / f"on_{protocol['dataset']}"
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
    """4 methods x 2 shots x 3 training seeds on miniimagenet; each method a fixed shift above ft."""
    runs = []
    for seed in (1, 2, 3):
        for shot in (1, 5):
            base = _accuracies(10 * seed + shot)
            for k, method in enumerate(METHODS):
                shifted = np.clip(base + k * 4 / 75, 0, 1)
                runs.append(_write_run(tmp_path, method, shot, shifted, seed=seed))
    return tmp_path, runs


def _summary(pairs):
    return build_summary(load_runs(pairs))


# ----------------------------------------------------------------------------- layers
#: What importing each layer must not load. Training imports mtl.stats for its validation interval
#: and must not pay seconds of pandas and scipy imports for it; the tables must work without the
#: plots (and matplotlib), which sit above them with the summarize step.
NOT_LOADED_BY = {
    "mtl.stats": ("pandas", "matplotlib", "scipy", "mtl.results"),
    "mtl.results": ("matplotlib", "mtl.plots", "mtl.report", "torch"),
    "mtl.plots": ("mtl.report",),
}


@pytest.mark.parametrize("module", NOT_LOADED_BY)
def test_a_layer_loads_nothing_above_it(module):
    forbidden = NOT_LOADED_BY[module]
    code = f"import sys, {module}; print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    # a fresh interpreter: this one has loaded everything already
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"importing {module} loads {result.stdout.strip()}"


def test_pooling_reliability_tables_loads_no_torch():
    """The summarize step pools the runs' reliability tables (NumPy sums): loading torch for it
    took summarize of 30 runs from 169 to 704 MiB peak RSS."""
    code = ("import sys; from mtl.results.tables import pooled_reliability; pooled_reliability([]); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


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


# ----------------------------------------------------------------------------- across seeds
def test_t_interval_matches_hand_computation():
    # [70, 72, 77]: mean 73, sd = sqrt((9 + 1 + 16) / 2) = sqrt(13); t(0.975, 2) = 4.302653
    mean, half, sd = t_interval([70.0, 72.0, 77.0])
    assert mean == 73.0 and sd == pytest.approx(math.sqrt(13))
    assert half == pytest.approx(4.302653 * math.sqrt(13) / math.sqrt(3), rel=1e-6)
    # ten seeds: t(0.975, 9) = 2.262157
    assert t_interval(np.arange(10.0))[1] == pytest.approx(2.262157 * np.arange(10.0).std(ddof=1) / math.sqrt(10), rel=1e-6)


def test_t_interval_of_one_seed_is_not_measured():
    mean, half, sd = t_interval([61.5])
    assert mean == 61.5 and math.isnan(half) and math.isnan(sd)


#: ft differs from seed to seed (another pre-trained encoder each), so pairing a method's seed with
#: another seed's ft changes every number below. Means in %: 50, 45, 60.
HAND_FT = {1: [0.5, 0.5, 0.5, 0.5], 2: [0.4, 0.6, 0.5, 0.3], 3: [0.7, 0.6, 0.6, 0.5]}
#: mtl minus the ft of its own seed, per episode in points: [10, 10, 0, 0], [0, 0, 0, 20], [-10, 0, 0, 0]
#: -> per seed +5, +5, -2.5 -> mean 2.5, sd = sqrt(18.75), half = t(0.975, 2) * 2.5. Means in %: 55, 50, 57.5.
HAND_MTL = {1: [0.6, 0.6, 0.5, 0.5], 2: [0.4, 0.6, 0.5, 0.5], 3: [0.6, 0.6, 0.6, 0.5]}
T_975_1DOF = 12.706204736174698  # Student t quantile 0.975, 1 degree of freedom (two paired seeds)


def _hand_runs(root, seeds=(1, 2, 3), ft_seeds=(1, 2, 3), calibration=None):
    """ft and mtl on 4 episodes; ``calibration``: {(method, seed): metrics keys} where they have them."""
    calibration = calibration or {}
    runs = [_write_run(root, "ft", 1, HAND_FT[s], calibration.get(("ft", s)), seed=s) for s in ft_seeds]
    return runs + [_write_run(root, "mtl", 1, HAND_MTL[s], calibration.get(("mtl", s)), seed=s) for s in seeds]


def _expected_vs_ft(method_accuracies, ft_accuracies, seeds):
    """The ``*_vs_ft`` cells from the formulas, independently of mtl.results: per seed
    d_s = mean over episodes of 100 * (method_s - ft_s); then mean, sd (n-1) and t(0.975, n-1) * sd / sqrt(n)
    over the n seeds both have."""
    from scipy.stats import t

    d = np.array([np.mean(100 * (np.asarray(method_accuracies[s]) - np.asarray(ft_accuracies[s]))) for s in seeds])
    n = len(d)
    mean = d.sum() / n
    half = t.ppf(0.975, n - 1) * math.sqrt(((d - mean) ** 2).sum() / (n - 1)) / math.sqrt(n) if n > 1 else math.nan
    return {"diff_vs_ft": mean, "diff_vs_ft_ci95": half, "seeds_paired_with_ft": n,
            "seeds_above_ft": int((d > 0).sum()), "seeds_below_ft": int((d < 0).sum())}


def _assert_vs_ft(row, expected):
    for column, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(row[column]), column
        else:
            assert row[column] == pytest.approx(value, rel=1e-9, abs=1e-9), column


def test_paired_difference_over_seeds_matches_hand_computation(tmp_path):
    table = _summary(_hand_runs(tmp_path))
    mtl = table[table["method"] == "mtl"].iloc[0]
    assert mtl["n_seeds"] == 3 and mtl["seeds"] == "1 2 3" and mtl["seeds_paired_with_ft"] == 3
    assert mtl["accuracy"] == pytest.approx((55.0 + 50.0 + 57.5) / 3)
    assert mtl["diff_vs_ft"] == pytest.approx(2.5)
    assert mtl["diff_vs_ft_ci95"] == pytest.approx(4.302653 * 2.5, rel=1e-6)
    assert (mtl["seeds_above_ft"], mtl["seeds_below_ft"]) == (2, 1)
    _assert_vs_ft(mtl, _expected_vs_ft(HAND_MTL, HAND_FT, (1, 2, 3)))
    assert mtl["verdict"] == "no detectable difference"
    assert mtl["interval"] == SEED_INTERVAL
    # episode interval of the seed-averaged per-episode differences: [0, 3.33, 0, 6.67] points
    assert mtl["diff_vs_ft_episode_ci95"] == pytest.approx(ci95([0.0, 10 / 3, 0.0, 20 / 3]))
    ft = table[table["method"] == "ft"].iloc[0]
    # ft: 50, 45, 60 -> mean 155/3, deviations -5/3, -20/3, 25/3 -> sd = sqrt((1050/9) / 2)
    assert ft["accuracy"] == pytest.approx(155 / 3)
    assert ft["seed_std"] == pytest.approx(math.sqrt(1050 / 9 / 2))
    assert ft["ci95"] == pytest.approx(4.302653 * math.sqrt(1050 / 9 / 2) / math.sqrt(3), rel=1e-6)
    assert ft["verdict"] == "" and math.isnan(ft["diff_vs_ft"]) and math.isnan(ft["seeds_paired_with_ft"])
    assert verdict_sentences(table) == [
        "mtl vs ft, miniimagenet 5-way 1-shot: +2.50 ± 10.76 points over 3 seeds (2 of 3 favour mtl): "
        "no detectable difference."
    ]


def test_verdict_says_better_or_worse_when_the_interval_excludes_zero(tmp_path):
    # +5, +6, +7 points on every seed: mean 6, sd 1, half 4.302653 / sqrt(3) = 2.48 -> better
    for seed, shift in zip((1, 2, 3), (0.05, 0.06, 0.07)):
        _write_run(tmp_path, "ft", 1, HAND_FT[seed], seed=seed)
        _write_run(tmp_path, "mtl", 1, np.add(HAND_FT[seed], shift), seed=seed)
        _write_run(tmp_path, "proto", 1, np.subtract(HAND_FT[seed], shift), seed=seed)
    pairs = [(js, js.with_name("episodes.csv")) for js in sorted(tmp_path.rglob("metrics.json"))]
    table = _summary(pairs)
    verdicts = dict(zip(table["method"], table["verdict"]))
    assert verdicts["mtl"] == "better" and verdicts["proto"] == "worse"
    sentences = verdict_sentences(table)
    assert any(s.startswith("mtl vs ft") and s.endswith("mtl is better.") and "+6.00 ± 2.48" in s for s in sentences)
    assert any(s.startswith("proto vs ft") and s.endswith("proto is worse.") for s in sentences)


#: ft per seed over 4 episodes (fractions), different on each seed.
SPLIT_FT = {1: [0.40, 0.50, 0.45, 0.55], 2: [0.60, 0.35, 0.50, 0.40], 3: [0.30, 0.45, 0.65, 0.50]}
#: Method minus the ft of the same seed, per episode, in points. Where the interval over seeds and the
#: interval over test episodes disagree, only the first may decide the verdict:
#: - mtl: +5, +6, +7 per seed (mean 6, sd 1, seed half t2 / sqrt(3) = 2.48: better), but +-20 from episode
#:   to episode: seed-averaged per-episode differences [26, -14, 26, -14], episode half 1.96 * 20 / 2 = 19.6.
#: - logreg: the mirror image, -5, -6, -7 per seed: worse over seeds, episode half 19.6.
#: - proto: -1, -9, -2 per seed, the same on every episode (mean -4, sd sqrt(19), seed half
#:   t2 * sqrt(19) / sqrt(3) = 10.83: no detectable difference), but episode half 0 (-4 on every episode).
SPLIT_DELTA = {
    "mtl": {1: [25, -15, 25, -15], 2: [26, -14, 26, -14], 3: [27, -13, 27, -13]},
    "logreg": {1: [-25, 15, -25, 15], 2: [-26, 14, -26, 14], 3: [-27, 13, -27, 13]},
    "proto": {1: [-1] * 4, 2: [-9] * 4, 3: [-2] * 4},
}


def test_verdict_uses_the_interval_over_seeds_not_over_episodes(tmp_path):
    runs = [_write_run(tmp_path, "ft", 1, SPLIT_FT[s], seed=s) for s in (1, 2, 3)]
    accuracies = {m: {s: np.add(SPLIT_FT[s], np.divide(d, 100)) for s, d in deltas.items()}
                  for m, deltas in SPLIT_DELTA.items()}
    runs += [_write_run(tmp_path, m, 1, acc[s], seed=s) for m, acc in accuracies.items() for s in (1, 2, 3)]
    table = _summary(runs).set_index("method")
    half_mtl, half_proto = 4.302653 / math.sqrt(3), 4.302653 * math.sqrt(19) / math.sqrt(3)
    expected = {  # method: (diff, seed half-width, episode half-width, verdict)
        "mtl": (6.0, half_mtl, 19.6, "better"),
        "logreg": (-6.0, half_mtl, 19.6, "worse"),
        "proto": (-4.0, half_proto, 0.0, "no detectable difference"),
    }
    for method, (diff, seed_half, episode_half, word) in expected.items():
        row = table.loc[method]
        assert row["diff_vs_ft"] == pytest.approx(diff), method
        assert row["diff_vs_ft_ci95"] == pytest.approx(seed_half, rel=1e-6), method
        assert row["diff_vs_ft_episode_ci95"] == pytest.approx(episode_half, abs=1e-9), method
        _assert_vs_ft(row, _expected_vs_ft(accuracies[method], SPLIT_FT, (1, 2, 3)))
        assert row["verdict"] == word, method
        # the premise: the episode interval would have said something else
        assert verdict(diff, episode_half, 3) != word, method
    sentences = verdict_sentences(table.reset_index())
    assert ("mtl vs ft, miniimagenet 5-way 1-shot: +6.00 ± 2.48 points over 3 seeds (3 of 3 favour mtl): "
            "mtl is better.") in sentences
    assert ("logreg vs ft, miniimagenet 5-way 1-shot: -6.00 ± 2.48 points over 3 seeds (0 of 3 favour logreg): "
            "logreg is worse.") in sentences
    assert ("proto vs ft, miniimagenet 5-way 1-shot: -4.00 ± 10.83 points over 3 seeds (0 of 3 favour proto): "
            "no detectable difference.") in sentences


def test_one_seed_tables_say_training_variance_is_not_measured(tmp_path):
    table = _summary(_hand_runs(tmp_path, seeds=(1,), ft_seeds=(1,)))
    assert (table["interval"] == NOT_MEASURED).all()
    assert table["ci95"].isna().all() and table["seed_std"].isna().all()
    mtl = table[table["method"] == "mtl"].iloc[0]
    assert mtl["diff_vs_ft"] == pytest.approx(5.0) and math.isnan(mtl["diff_vs_ft_ci95"])
    assert mtl["verdict"] == "training variance not measured"
    (sentence,) = verdict_sentences(table)
    assert "+5.00 points on 1 seed" in sentence and "training variance not measured, so no verdict" in sentence
    # the episode interval is still there, named as what it is
    assert mtl["episode_ci95"] == pytest.approx(ci95([60.0, 60.0, 50.0, 50.0]))


@pytest.mark.parametrize("ft_seeds", [(1, 2), (1, 3), (2, 3)])
def test_pairing_uses_the_seeds_both_methods_have(tmp_path, ft_seeds):
    table = _summary(_hand_runs(tmp_path, seeds=(1, 2, 3), ft_seeds=ft_seeds))
    mtl = table[table["method"] == "mtl"].iloc[0]
    assert mtl["n_seeds"] == 3 and mtl["seeds"] == "1 2 3" and mtl["seeds_paired_with_ft"] == 2
    _assert_vs_ft(mtl, _expected_vs_ft(HAND_MTL, HAND_FT, ft_seeds))
    # by hand: per seed +5, +5, -2.5 (see HAND_MTL); two seeds -> t(0.975, 1) * |d1 - d2| / 2
    by_seed = {1: 5.0, 2: 5.0, 3: -2.5}
    d1, d2 = (by_seed[s] for s in ft_seeds)
    assert mtl["diff_vs_ft"] == pytest.approx((d1 + d2) / 2)
    assert mtl["diff_vs_ft_ci95"] == pytest.approx(T_975_1DOF * abs(d1 - d2) / 2, abs=1e-9)
    assert (mtl["seeds_above_ft"], mtl["seeds_below_ft"]) == ((d1 > 0) + (d2 > 0), (d1 < 0) + (d2 < 0))


@pytest.mark.parametrize("ft_seeds, above, phrase", [
    ((1, 2), 2, "+5.00 ± 0.00 points over 2 seeds (2 of 2 favour mtl): mtl is better."),
    ((1, 3), 1, f"+1.25 ± {T_975_1DOF * 3.75:.2f} points over 2 seeds (1 of 2 favour mtl): no detectable difference."),
    ((1,), 1, "+5.00 points on 1 seed (± 4.90 from test-episode sampling alone): training variance not measured"),
])
def test_the_difference_reports_its_paired_seeds_not_the_methods_seeds(tmp_path, ft_seeds, above, phrase):
    """mtl ran seeds 1-3, ft fewer: the difference, its sentence and 'k of n' count the paired seeds."""
    runs = load_runs(_hand_runs(tmp_path, seeds=(1, 2, 3), ft_seeds=ft_seeds))
    table = build_summary(runs)
    mtl = table[table["method"] == "mtl"].iloc[0]
    assert mtl["n_seeds"] == 3 and mtl["seeds_paired_with_ft"] == len(ft_seeds)
    assert mtl["seeds_above_ft"] == above
    (sentence,) = verdict_sentences(table)
    assert phrase in sentence and "3 seeds" not in sentence
    columns = list(table.columns)
    assert columns.index("seeds_paired_with_ft") == columns.index("diff_vs_ft_episode_ci95") + 1
    assert columns.index("seeds_above_ft") == columns.index("seeds_paired_with_ft") + 1

    out = tmp_path / "out"
    write_summary(table, per_seed_table(runs), csv_path=out / "summary.csv", per_seed_csv_path=out / "per_seed.csv",
                  md_path=out / "summary.md", rst_path=out / "summary.rst")
    written = pd.read_csv(out / "summary.csv").set_index("method")
    assert written.loc["mtl", "seeds_paired_with_ft"] == len(ft_seeds) and written.loc["mtl", "n_seeds"] == 3
    assert pd.isna(written.loc["ft", "seeds_paired_with_ft"])
    assert f",{len(ft_seeds)},{above}," in (out / "summary.csv").read_text()  # written as integers
    # the table's 'seeds' column is the method's own count; 'seeds above ft' counts out of the paired ones
    markdown = (out / "summary.md").read_text()
    assert "| 1 | mtl | 3 | " in markdown and f"| {above} of {len(ft_seeds)} |" in markdown
    assert "seeds_paired_with_ft" in markdown and "seeds_paired_with_ft" in (out / "summary.rst").read_text()
    assert phrase in markdown and phrase in (out / "summary.rst").read_text()


def test_per_seed_table_pairs_each_seed_with_its_own_baseline(tmp_path):
    per_seed = per_seed_table(load_runs(_hand_runs(tmp_path)))
    mtl = per_seed[per_seed["method"] == "mtl"].set_index("seed")
    assert mtl["diff_vs_ft"].to_dict() == pytest.approx({1: 5.0, 2: 5.0, 3: -2.5})
    # each seed's episode interval of its own differences: 1.96 * population std / sqrt(4)
    differences = {s: 100 * (np.array(HAND_MTL[s]) - np.array(HAND_FT[s])) for s in (1, 2, 3)}
    expected = {s: 1.96 * math.sqrt(np.mean((d - d.mean()) ** 2)) / 2 for s, d in differences.items()}
    assert expected == pytest.approx({1: 4.9, 2: 1.96 * math.sqrt(75) / 2, 3: 1.96 * math.sqrt(18.75) / 2})
    assert mtl["diff_vs_ft_ci95"].to_dict() == pytest.approx(expected)
    assert mtl["accuracy"].to_dict() == pytest.approx({1: 55.0, 2: 50.0, 3: 57.5})
    assert per_seed.loc[per_seed["method"] == "ft", "diff_vs_ft"].isna().all()
    assert (per_seed["interval"] == INTERVAL_FORMULA).all()
    assert per_seed["method"].tolist() == ["ft"] * 3 + ["mtl"] * 3


# ----------------------------------------------------------------------------- summary table
def test_build_summary_rows_order_and_diffs(tree):
    _, runs = tree
    table = _summary(list(reversed(runs)))
    assert len(table) == 8
    assert table["shot"].tolist() == [1, 1, 1, 1, 5, 5, 5, 5]
    assert table["method"].tolist() == METHODS * 2
    assert (table["n_seeds"] == 3).all() and set(table["interval"]) == {SEED_INTERVAL}
    assert table.loc[table["method"] == "ft", "diff_vs_ft"].isna().all()
    others = table[table["method"] != "ft"]
    # each method is ft shifted by k * 4/75 on every episode (few clipped): positive, ordered diffs
    assert (others["diff_vs_ft"] > 0).all() and (others["seeds_above_ft"] == 3).all()
    assert others.groupby("shot")["diff_vs_ft"].apply(lambda d: d.is_monotonic_increasing).all()
    proto_1 = table[(table["method"] == "proto") & (table["shot"] == 1)].iloc[0]
    ft_1 = table[(table["method"] == "ft") & (table["shot"] == 1)].iloc[0]
    assert proto_1["diff_vs_ft"] == pytest.approx(proto_1["accuracy"] - ft_1["accuracy"])


def test_build_summary_reference_only_for_mtl_methods_on_5way(tree):
    table = _summary(tree[1])
    with_reference = table[table["reference_accuracy"].notna()]
    assert set(with_reference["method"]) == {"mtl", "mtl_ht"}
    row = table[(table["method"] == "mtl_ht") & (table["shot"] == 5)].iloc[0]
    assert (row["reference_accuracy"], row["reference_ci95"]) == (75.5, 0.8)
    assert "MTL+HT" in row["reference_source"] and "queries per class = shot" in row["reference_source"]
    assert (table.loc[table["reference_accuracy"].isna(), "reference_source"] == "").all()


def test_build_summary_no_reference_for_other_ways(tmp_path):
    runs = [_write_run(tmp_path, "mtl", 1, _accuracies(1), way=10)]
    assert _summary(runs)["reference_accuracy"].isna().all()


def test_build_summary_without_baseline_leaves_diff_empty(tmp_path):
    runs = [_write_run(tmp_path, m, 1, _accuracies(1)) for m in ("proto", "mtl")]
    assert _summary(runs)["diff_vs_ft"].isna().all()


def test_build_summary_refuses_mismatched_protocol(tmp_path):
    ft = _write_run(tmp_path, "ft", 1, _accuracies(1))
    mtl = _write_run(tmp_path, "mtl", 1, _accuracies(1), episode_seed=2, sha="other-episodes")
    with pytest.raises(ConfigError) as error:
        _summary([ft, mtl])
    message = str(error.value)
    assert str(ft[0]) in message and str(mtl[0]) in message
    assert "episode_seed" in message and "episodes_sha256" in message and "query" not in message


def test_build_summary_refuses_duplicates(tree):
    _, runs = tree
    with pytest.raises(ConfigError, match="two runs"):
        _summary(runs + [runs[0]])


def test_build_summary_refuses_stale_file_pair(tree):
    _, runs = tree
    mixed = (runs[0][0], runs[4][1])  # 1-shot metrics with 5-shot episodes
    with pytest.raises(DataError, match="different evaluations"):
        _summary([mixed])


def test_write_summary_files(tree, tmp_path):
    runs = load_runs(tree[1])
    table, per_seed = build_summary(runs), per_seed_table(runs)
    out = tmp_path / "out"
    write_summary(table, per_seed, csv_path=out / "summary.csv", per_seed_csv_path=out / "per_seed.csv",
                  md_path=out / "summary.md", rst_path=out / "summary.rst")
    written = pd.read_csv(out / "summary.csv")
    assert len(written) == 8 and list(written.columns) == list(table.columns)
    assert (written["accuracy"] == written["accuracy"].round(2)).all()
    assert written.loc[written["method"] == "ft", "diff_vs_ft"].isna().all()
    seeds = pd.read_csv(out / "per_seed.csv")
    assert len(seeds) == 24 and sorted(seeds["seed"].unique()) == [1, 2, 3]
    text = (out / "summary.md").read_text()
    assert SEED_INTERVAL in text and INTERVAL_FORMULA in text and "paired" in text
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 8
    assert table_lines[0].startswith("| dataset | backbone | shot | method | seeds")
    assert "75.5 ± 0.8 [" in text and "[1] MTL paper (no HT)" in text
    assert text.count("points over 3 seeds") == 6  # one verdict per method and shot, ft excluded


def test_summary_rst_renders_without_docutils_errors(tree, tmp_path):
    from docutils.core import publish_parts

    runs = load_runs(tree[1])
    out = tmp_path / "out"
    write_summary(build_summary(runs), per_seed_table(runs), csv_path=out / "s.csv", per_seed_csv_path=out / "p.csv",
                  md_path=out / "s.md", rst_path=out / "s.rst")
    html = publish_parts((out / "s.rst").read_text(), writer="html",
                         settings_overrides={"halt_level": 2, "report_level": 2})["html_body"]
    assert "<table" in html and "Verdicts" in html and "points over 3 seeds" in html


def _front_page_tables(rst: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, column titles, body rows) of each table of the report's front page, as docutils reads it."""
    from docutils import nodes
    from docutils.core import publish_doctree

    doctree = publish_doctree(rst, settings_overrides={"halt_level": 2, "report_level": 2})
    tables = []
    for table in doctree.findall(nodes.table):
        caption = table.next_node(nodes.title).astext()
        titles = [entry.astext() for entry in table.next_node(nodes.thead).findall(nodes.entry)]
        rows = [[entry.astext() for entry in row.findall(nodes.entry)]
                for row in table.next_node(nodes.tbody).findall(nodes.row)]
        tables.append((caption, titles, rows))
    return tables


def _markdown_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_report_front_page_table_is_compact_and_never_wraps_a_number(tree):
    """Snakemake's report gives the front page a 512 px column beside the workflow graph: the full
    ten-column table overlapped the graph and broke "60.63 ± 5.29" over two lines (issue 18)."""
    summary = build_summary(load_runs(tree[1]))
    ((caption, titles, rows),) = _front_page_tables(summary_rst(summary))
    # every row ran seeds 1-3, which the protocol line states: no seeds column, no dataset/backbone column
    assert caption == "miniimagenet, resnet12"
    assert titles == ["shot", "method", "accuracy (%)", "vs ft (pp)", "published (%)"]
    # the same cells as summary.md, with every space inside a cell non-breaking
    full = _markdown_rows(summary_markdown(summary))
    md_titles = [line for line in summary_markdown(summary).splitlines() if line.startswith("|")][0]
    keep = [[t.strip() for t in md_titles.strip("|").split("|")].index(t) for t in titles]
    assert [[cell.replace("\u00a0", " ") for cell in row] for row in rows] == [[r[i] for i in keep] for r in full]
    assert all(" " not in cell for row in rows for cell in row)
    assert any("\u00a0±\u00a0" in cell for row in rows for cell in row)
    assert "60.2\u00a0±\u00a01.8\u00a0[1]" in [row[-1] for row in rows]


def test_the_front_page_shows_seeds_when_rows_ran_different_ones_and_a_table_per_pair(tmp_path):
    uneven = build_summary(load_runs(_hand_runs(tmp_path, seeds=(1, 2, 3), ft_seeds=(1, 2))))
    ((_, titles, rows),) = _front_page_tables(summary_rst(uneven))
    assert titles == ["shot", "method", "seeds", "accuracy (%)", "vs ft (pp)", "published (%)"]
    assert [row[:3] for row in rows] == [["1", "ft", "2"], ["1", "mtl", "3"]]
    # transfer: one table per (trained on, tested on), in the summary's order, each row in exactly one
    transfer = _summary(_transfer_runs(tmp_path / "transfer"))
    tables = _front_page_tables(summary_rst(transfer))
    assert [caption for caption, _, _ in tables] == [
        "fc100, resnet12", "miniimagenet, resnet12", "trained on fc100, tested on my_parts, resnet12",
        "trained on miniimagenet, tested on fc100, resnet12", "trained on miniimagenet, tested on my_parts, resnet12"]
    assert sum(len(rows) for _, _, rows in tables) == len(transfer)


def test_the_front_page_style_selects_the_section_summary_rst_writes(tree):
    """rules/report/workflow.rst top-aligns the report's front page by the id of the summary's section:
    renaming the section's title would silently cut the page's top off again in a short window."""
    import re
    from pathlib import Path

    from docutils.core import publish_parts

    front_page = (Path(__file__).resolve().parent.parent / "rules" / "report" / "workflow.rst").read_text()
    (style,) = re.findall(r"<style>(.*?)</style>", front_page)
    (section,) = re.findall(r":has\(#([\w-]+)\)", style)
    html = publish_parts(summary_rst(build_summary(load_runs(tree[1]))), writer="html")["html_body"]
    assert f'id="{section}"' in html


# ----------------------------------------------------------------------------- plots
def _tables(tree):
    runs = load_runs(tree[1])
    return build_summary(runs), per_seed_table(runs)


def test_plot_accuracies_writes_png(tree, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_accuracies(*_tables(tree), tmp_path / "plots" / "accuracy.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_summarize_runs_writes_every_output_of_the_summarize_step(tree, tmp_path):
    pytest.importorskip("matplotlib")
    root, pairs = tree
    history = _history(root / "fc100/resnet12/seed1/pretrain/history.csv", np.arange(1, 4),
                       train_loss=[2.0, 1.5, 1.2], val_acc=[0.4, 0.5, 0.55])
    out = tmp_path / "summary"
    names = dict(csv_out="summary.csv", per_seed_csv_out="summary_per_seed.csv", md_out="summary.md",
                 rst_out="summary.rst", accuracy_plot="accuracy.png", reliability_plot="reliability.png",
                 history_plot="history.png")
    summary = summarize_runs([m for m, _ in pairs], [e for _, e in pairs], [history],
                             **{key: out / name for key, name in names.items()})
    assert sorted(p.name for p in out.iterdir()) == sorted(names.values())
    written = pd.read_csv(out / "summary.csv")
    assert list(written["method"]) == list(summary["method"]) and len(written) == 2 * len(METHODS)
    assert (out / "summary.md").read_text() == summary_markdown(summary)
    assert (out / "summary.rst").read_text() == summary_rst(summary)
    assert len(pd.read_csv(out / "summary_per_seed.csv")) == len(pairs)
    assert all((out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
               for png in ("accuracy.png", "reliability.png", "history.png"))


def _history(path, epochs, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"epoch": epochs, **columns}).to_csv(path, index=False)
    return path


def test_plot_histories_writes_png_with_a_band_over_seeds(tmp_path):
    pytest.importorskip("matplotlib")
    epochs = np.arange(1, 6)
    files = []
    for seed in (1, 2):
        run = tmp_path / "results/fc100/resnet12" / f"seed{seed}"
        files.append(_history(run / "pretrain/history.csv", epochs, train_loss=2.0 / epochs,
                              val_acc=0.4 + 0.02 * epochs * seed))
        files.append(_history(run / "mtl/1shot/history.csv", epochs, meta_loss=1.0 / epochs, val_acc=50 + epochs))
    path = plot_histories(files, tmp_path / "history.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_histories_names_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing.csv"):
        plot_histories([tmp_path / "missing.csv"], tmp_path / "h.png")


def test_plots_without_matplotlib_say_what_to_install(tree, tmp_path, monkeypatch):
    tables = _tables(tree)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MTLError, match="install"):
        plot_accuracies(*tables, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_history_run_names_dataset_method_shot_and_seed():
    assert history_run("results/fc100/resnet12/seed3/pretrain/history.csv") == ("fc100 pretrain", 3)
    assert history_run("results/fc100/resnet12/seed12/mtl_ht/5shot/history.csv") == ("fc100 mtl_ht 5shot", 12)


# ----------------------------------------------------------------------------- transfer
#: Per-seed accuracies (fractions, constant over 4 episodes) of ft and mtl, keyed by
#: (trained on, tested on). Every ft differs across seeds and across sources, so pairing a transfer
#: run with the wrong ft run (another source, the target's own ft, another seed) changes the numbers.
TRANSFER_FT = {
    ("miniimagenet", "miniimagenet"): {1: 0.60, 2: 0.62, 3: 0.64},
    ("fc100", "fc100"): {1: 0.44, 2: 0.46, 3: 0.48},
    ("miniimagenet", "fc100"): {1: 0.30, 2: 0.36, 3: 0.42},
    ("miniimagenet", "my_parts"): {1: 0.40, 2: 0.50, 3: 0.60},
    ("fc100", "my_parts"): {1: 0.28, 2: 0.52, 3: 0.70},
}
#: mtl minus the ft of the same source and seed, in points: the numbers the tests expect.
TRANSFER_GAIN = {
    ("miniimagenet", "miniimagenet"): {1: 5.0, 2: 5.0, 3: 5.0},
    ("fc100", "fc100"): {1: 1.0, 2: 2.0, 3: 3.0},
    ("miniimagenet", "fc100"): {1: -2.0, 2: 4.0, 3: 1.0},
    ("miniimagenet", "my_parts"): {1: 8.0, 2: 4.0, 3: 10.0},
    ("fc100", "my_parts"): {1: 5.0, 2: -5.0, 3: 6.0},
}
T_975_2DOF = 4.302652729911275


def _transfer_runs(root, pairs=tuple(TRANSFER_FT)):
    runs = []
    for trained_on, dataset in pairs:
        for seed, ft in TRANSFER_FT[trained_on, dataset].items():
            mtl = ft + TRANSFER_GAIN[trained_on, dataset][seed] / 100
            for method, value in (("ft", ft), ("mtl", mtl)):
                transfer = {"trained_on": trained_on} if trained_on != dataset else {}
                runs.append(_write_run(root, method, 1, [value] * 4, dataset=dataset, seed=seed, **transfer))
    return runs


def _row(table, trained_on, dataset, method="mtl"):
    rows = table[(table["trained_on"] == trained_on) & (table["dataset"] == dataset) & (table["method"] == method)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_a_transfer_run_pairs_with_ft_of_the_same_source_and_seed(tmp_path):
    table = _summary(_transfer_runs(tmp_path))
    assert len(table) == 2 * len(TRANSFER_FT)
    for (trained_on, dataset), gains in TRANSFER_GAIN.items():
        row = _row(table, trained_on, dataset)
        mean, half, _ = t_interval(list(gains.values()))
        assert row["diff_vs_ft"] == pytest.approx(mean), (trained_on, dataset)
        assert row["diff_vs_ft_ci95"] == pytest.approx(half)
        assert row["seeds_above_ft"] == sum(g > 0 for g in gains.values())
        accuracies = [100 * TRANSFER_FT[trained_on, dataset][s] + gains[s] for s in (1, 2, 3)]
        assert row["accuracy"] == pytest.approx(np.mean(accuracies))
        assert row["ci95"] == pytest.approx(t_interval(accuracies)[1])
    # by hand: trained on fc100, tested on my_parts: +5, -5, +6 -> mean 2, sd sqrt(37), t * sd / sqrt(3)
    row = _row(table, "fc100", "my_parts")
    assert row["diff_vs_ft"] == pytest.approx(2.0)
    assert row["diff_vs_ft_ci95"] == pytest.approx(T_975_2DOF * math.sqrt(37) / math.sqrt(3))
    assert (row["seeds_above_ft"], row["seeds_below_ft"], row["n_seeds"]) == (2, 1, 3)

    per_seed = per_seed_table(load_runs(_transfer_runs(tmp_path / "again")))
    for (trained_on, dataset), gains in TRANSFER_GAIN.items():
        mine = per_seed[(per_seed["trained_on"] == trained_on) & (per_seed["dataset"] == dataset)
                        & (per_seed["method"] == "mtl")].set_index("seed")
        assert mine["diff_vs_ft"].to_dict() == pytest.approx(gains), (trained_on, dataset)


def test_transfer_rows_leave_the_in_domain_rows_as_they_were(tmp_path):
    in_domain = [("miniimagenet", "miniimagenet"), ("fc100", "fc100")]
    alone = _summary(_transfer_runs(tmp_path / "alone", in_domain))
    with_transfer = _summary(_transfer_runs(tmp_path / "all"))
    assert (alone["trained_on"] == alone["dataset"]).all()
    # in-domain rows first, in their usual order, with the same numbers; then the transfer rows
    pd.testing.assert_frame_equal(with_transfer.iloc[:len(alone)], alone)
    assert (with_transfer.iloc[len(alone):]["trained_on"] != with_transfer.iloc[len(alone):]["dataset"]).all()
    assert list(with_transfer.columns[:2]) == ["trained_on", "dataset"]
    assert list(per_seed_table(load_runs(_transfer_runs(tmp_path / "seeds"))).columns[:2]) == ["trained_on", "dataset"]


def test_a_metrics_file_without_trained_on_reads_as_in_domain(tmp_path):
    runs = _hand_runs(tmp_path)
    before = _summary(runs)
    for js, _ in runs:
        metrics = json.loads(js.read_text())
        assert list(metrics)[:2] == ["trained_on", "dataset"] and metrics["trained_on"] == "miniimagenet"
        del metrics["trained_on"]  # as written before transfer evaluation existed
        js.write_text(json.dumps(metrics, indent=2) + "\n")
    loaded = load_runs(runs)
    assert all(run.metrics["trained_on"] == "miniimagenet" and not run.is_transfer for run in loaded)
    pd.testing.assert_frame_equal(_summary(runs), before)
    assert (before["trained_on"] == "miniimagenet").all()
    # an old in-domain ft still pairs with a new in-domain mtl of the same dataset and seed
    proto = _summary(runs + [_write_run(tmp_path, "proto", 1, HAND_MTL[1], seed=1)])
    assert _row(proto, "miniimagenet", "miniimagenet", "proto")["diff_vs_ft"] == pytest.approx(5.0)


def test_transfer_verdicts_name_both_datasets_and_in_domain_ones_stay_as_they_were(tmp_path):
    sentences = verdict_sentences(_summary(_transfer_runs(tmp_path)))
    assert len(sentences) == len(TRANSFER_FT)
    half = T_975_2DOF * math.sqrt(37) / math.sqrt(3)
    assert (f"mtl vs ft, trained on fc100, tested on my_parts 5-way 1-shot: +2.00 ± {half:.2f} points over 3 seeds "
            "(2 of 3 favour mtl): no detectable difference.") in sentences
    # +5 on every seed: sd 0, so the interval is 0 and the verdict 'better'
    assert ("mtl vs ft, miniimagenet 5-way 1-shot: +5.00 ± 0.00 points over 3 seeds (3 of 3 favour mtl): "
            "mtl is better.") in sentences
    assert sum(", trained on miniimagenet, tested on fc100 5-way" in s for s in sentences) == 1
    assert sum(s.startswith("mtl vs ft, fc100 5-way") for s in sentences) == 1


def test_transfer_tables_show_where_each_row_was_trained_and_no_published_figure(tmp_path):
    table = _summary(_transfer_runs(tmp_path))
    # miniimagenet and fc100 have published 5-way 1-shot mtl figures; models trained elsewhere do not
    assert _row(table, "miniimagenet", "miniimagenet")["reference_accuracy"] == 60.2
    assert _row(table, "fc100", "fc100")["reference_accuracy"] == 43.6
    assert math.isnan(_row(table, "miniimagenet", "fc100")["reference_accuracy"])
    assert _row(table, "miniimagenet", "fc100")["reference_source"] == ""
    text = summary_markdown(table)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| trained on | dataset | backbone | shot | method")
    assert "| miniimagenet | fc100 | resnet12 | 1 | mtl | 3 |" in text
    assert "| fc100 | my_parts | resnet12 | 1 | ft | 3 |" in text
    assert "**trained on**" in text and "**trained on**" in summary_rst(table)
    # an in-domain table is drawn as before, without the column
    in_domain = _summary(_transfer_runs(tmp_path / "alone", [("fc100", "fc100")]))
    assert "trained on" not in summary_markdown(in_domain) and "trained on" not in summary_rst(in_domain)
    assert [line for line in summary_markdown(in_domain).splitlines() if line.startswith("|")][0].startswith(
        "| dataset | backbone | shot | method | seeds")


def test_transfer_tables_render_and_plot_one_panel_row_per_pair(tmp_path, monkeypatch):
    from docutils.core import publish_parts

    import mtl.plots

    runs = load_runs(_transfer_runs(tmp_path))
    summary, per_seed = build_summary(runs), per_seed_table(runs)
    html = publish_parts(summary_rst(summary), writer="html",
                         settings_overrides={"halt_level": 2, "report_level": 2})["html_body"]
    assert "<table" in html and "tested on my_parts" in html
    pytest.importorskip("matplotlib")
    panels = []
    original = mtl.plots._accuracy_panel

    def record(ax, rows, seeds, several):
        panels.append((set(rows["trained_on"]), set(rows["dataset"]), set(seeds["trained_on"]), len(seeds)))
        original(ax, rows, seeds, several)

    monkeypatch.setattr(mtl.plots, "_accuracy_panel", record)
    path = plot_accuracies(summary, per_seed, tmp_path / "accuracy.png")
    assert path.stat().st_size > 5000
    # one panel per (trained on, tested on) pair: never the target's own runs mixed with a source's
    assert len(panels) == len(TRANSFER_FT)
    assert all(len(trained) == 1 and len(tested) == 1 and seeds == trained and n == 6
               for trained, tested, seeds, n in panels)


# ----------------------------------------------------------------------------- calibration
#: Per run (method, seed): temperature, ECE (points) and NLL (nats) with the temperature, then without.
#: ft's ECE 4, 6, 11: mean 7, sd sqrt((9 + 1 + 16) / 2) = sqrt(13); its NLL 0.9, 0.8, 1.0: mean 0.9, sd 0.1.
HAND_CALIBRATION = {
    ("ft", 1): (1.5, 4.0, 0.90, 10.0, 1.20), ("ft", 2): (2.0, 6.0, 0.80, 14.0, 1.40),
    ("ft", 3): (0.8, 11.0, 1.00, 12.0, 1.10),
    ("mtl", 1): (1.2, 3.0, 0.70, 9.0, 1.00), ("mtl", 2): (1.1, 3.5, 0.75, 8.0, 0.90),
    ("mtl", 3): (1.4, 5.5, 0.65, 13.0, 1.30),
}
CALIBRATION_NAMES = ("temperature", "ece", "nll", "ece_uncalibrated", "nll_uncalibrated")
#: What each summary.csv calibration column averages over seeds.
BY_HAND = {"ece": 1, "nll": 2, "ece_uncalibrated": 3, "nll_uncalibrated": 4}


def _hand_calibration(seeds=(1, 2, 3)):
    return {(method, seed): dict(zip(CALIBRATION_NAMES, values))
            for (method, seed), values in HAND_CALIBRATION.items() if seed in seeds}


def _over_seeds_by_hand(values):
    """Mean and t(0.975, n-1) * sd / sqrt(n), sd with n-1, from the formula (NaN interval for one value)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = values.sum() / n
    if n < 2:
        return mean, math.nan
    return mean, t.ppf(0.975, n - 1) * math.sqrt(((values - mean) ** 2).sum() / (n - 1)) / math.sqrt(n)


def test_ece_and_nll_over_seeds_match_an_independent_computation(tmp_path):
    runs = load_runs(_hand_runs(tmp_path, calibration=_hand_calibration()))
    table, per_seed = build_summary(runs).set_index("method"), per_seed_table(runs)
    for method in ("ft", "mtl"):
        row = table.loc[method]
        for name, at in BY_HAND.items():
            mean, half = _over_seeds_by_hand([HAND_CALIBRATION[method, s][at] for s in (1, 2, 3)])
            assert row[name] == pytest.approx(mean, rel=1e-12), (method, name)
            if name in ("ece", "nll"):
                assert row[f"{name}_ci95"] == pytest.approx(half, rel=1e-9), (method, name)
        # each run's own values, seed by seed
        mine = per_seed[per_seed["method"] == method].set_index("seed")
        for at, name in enumerate(CALIBRATION_NAMES):
            assert mine[name].to_dict() == {s: HAND_CALIBRATION[method, s][at] for s in (1, 2, 3)}, (method, name)
    # by hand, ft: ECE 7 ± t(0.975, 2) * sqrt(13) / sqrt(3), NLL 0.9 ± t(0.975, 2) * 0.1 / sqrt(3)
    ft = table.loc["ft"]
    assert ft["ece"] == pytest.approx(7.0) and ft["ece_ci95"] == pytest.approx(T_975_2DOF * math.sqrt(13 / 3))
    assert ft["nll"] == pytest.approx(0.9) and ft["nll_ci95"] == pytest.approx(T_975_2DOF * 0.1 / math.sqrt(3))
    assert (ft["ece_uncalibrated"], ft["nll_uncalibrated"]) == pytest.approx((12.0, 3.7 / 3))
    # the premise: the population sd or the normal quantile would give other intervals
    assert ft["ece_ci95"] != pytest.approx(T_975_2DOF * np.std([4.0, 6.0, 11.0]) / math.sqrt(3), abs=0.5)
    assert ft["ece_ci95"] != pytest.approx(1.96 * math.sqrt(13 / 3), abs=0.5)
    columns = list(table.reset_index().columns)
    assert columns[-6:] == ["ece", "ece_ci95", "ece_uncalibrated", "nll", "nll_ci95", "nll_uncalibrated"]


def test_one_seed_gives_the_calibration_error_without_an_interval(tmp_path):
    runs = load_runs(_hand_runs(tmp_path, seeds=(2,), ft_seeds=(2,), calibration=_hand_calibration((2,))))
    ft = build_summary(runs).set_index("method").loc["ft"]
    assert ft["interval"] == NOT_MEASURED
    assert (ft["ece"], ft["nll"], ft["ece_uncalibrated"]) == (6.0, 0.8, 14.0)
    assert math.isnan(ft["ece_ci95"]) and math.isnan(ft["nll_ci95"])


def _strip_calibration(metrics_json):
    """The metrics file as evaluate wrote it before calibration existed."""
    metrics = json.loads(metrics_json.read_text())
    for key in (*CALIBRATION_NAMES, "reliability", "calibration_episodes"):
        metrics.pop(key, None)
    metrics_json.write_text(json.dumps(metrics, indent=2) + "\n")


def test_metrics_files_from_before_calibration_still_load(tmp_path):
    pytest.importorskip("matplotlib")
    calibrated = _hand_runs(tmp_path / "new", calibration=_hand_calibration())
    old = _hand_runs(tmp_path / "old")  # written without the keys
    new_table, old_table = _summary(calibrated), _summary(old)
    per_seed = per_seed_table(load_runs(old))
    assert per_seed[list(CALIBRATION_NAMES)].isna().all().all()
    calibration = ["ece", "ece_ci95", "ece_uncalibrated", "nll", "nll_ci95", "nll_uncalibrated"]
    assert old_table[calibration].isna().all().all()
    # everything else reads as it did
    pd.testing.assert_frame_equal(old_table.drop(columns=calibration), new_table.drop(columns=calibration))
    assert "## Calibration" not in summary_markdown(old_table) and "Calibration" not in summary_rst(old_table)
    assert "## Calibration" in summary_markdown(new_table)
    # one seed of mtl evaluated before calibration: mtl has no ECE (not a mean over two seeds), ft keeps its own
    _strip_calibration(calibrated[-1][0])
    mixed = _summary(calibrated).set_index("method")
    assert mixed.loc["mtl", calibration].isna().all()
    assert mixed.loc["ft", "ece"] == pytest.approx(7.0)
    # the summarize step writes every file, the reliability plot included
    out = tmp_path / "out"
    names = dict(csv_out="summary.csv", per_seed_csv_out="summary_per_seed.csv", md_out="summary.md",
                 accuracy_plot="accuracy.png", reliability_plot="reliability.png", history_plot="history.png")
    history = _history(tmp_path / "fc100/resnet12/seed1/pretrain/history.csv", np.arange(1, 4),
                       train_loss=[2.0, 1.5, 1.2])
    summarize_runs([m for m, _ in old], [e for _, e in old], [history], **{k: out / v for k, v in names.items()})
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _reliability_table(rng, bins=15):
    """A run's table of sums per confidence bin, like evaluate's: counts, confidences within each
    bin's edges, and how many of its queries were right."""
    count = rng.integers(0, 40, bins)
    count[rng.integers(bins)] = 0  # an empty bin, as high-confidence bins often are
    confidence = count * (np.arange(bins) + rng.uniform(0, 1, bins)) / bins
    correct = rng.binomial(count, np.linspace(0.3, 1.0, bins)).astype(float)
    return {"bins": bins, "count": count.tolist(), "confidence": confidence.tolist(), "correct": correct.tolist()}


def _random_calibration(rng):
    """Everything evaluate adds to metrics.json, with random values and a consistent ECE."""
    table = _reliability_table(rng)
    gap = np.abs(np.subtract(table["correct"], table["confidence"])).sum()
    return {"temperature": float(rng.uniform(0.3, 3.0)), "ece": float(100 * gap / np.sum(table["count"])),
            "nll": float(rng.uniform(0.3, 1.2)), "ece_uncalibrated": float(rng.uniform(5.0, 25.0)),
            "nll_uncalibrated": float(rng.uniform(0.8, 2.0)), "calibration_episodes": 200, "reliability": table}


def test_pooled_reliability_is_the_sum_of_the_runs_tables(tmp_path):
    rng = np.random.default_rng(3)
    tables = {}
    for shot in (1, 5):
        for method in ("ft", "mtl"):
            for seed in (1, 2, 3):
                calibration = _random_calibration(rng)
                tables[method, shot, seed] = calibration["reliability"]
                _write_run(tmp_path, method, shot, _accuracies(seed), calibration, seed=seed)
    pairs = [(js, js.with_name("episodes.csv")) for js in sorted(tmp_path.rglob("metrics.json"))]
    pooled = pooled_reliability(load_runs(pairs))
    assert set(pooled) == {("miniimagenet", "miniimagenet", "resnet12", method, shot)
                           for method in ("ft", "mtl") for shot in (1, 5)}
    for (_, _, _, method, shot), table in pooled.items():
        mine = [tables[method, shot, seed] for seed in (1, 2, 3)]
        for key in ("count", "confidence", "correct"):
            by_loop = [sum(t[key][b] for t in mine) for b in range(15)]
            assert table[key] == pytest.approx(by_loop, rel=1e-12), (method, shot, key)
        queries = sum(sum(t["count"]) for t in mine)
        gap = sum(abs(sum(t["correct"][b] for t in mine) - sum(t["confidence"][b] for t in mine)) for b in range(15))
        assert table["ece"] == pytest.approx(100 * gap / queries, rel=1e-12)
        assert table["bins"] == 15 and table["seeds"] == 3
        # the pooled ECE is not the mean of the runs' ECEs (summary.csv's ece): the plot says which it is
        runs_ece = [100 * np.abs(np.subtract(t["correct"], t["confidence"])).sum() / np.sum(t["count"]) for t in mine]
        assert table["ece"] != pytest.approx(np.mean(runs_ece), abs=1e-6)
    # a row with one seed evaluated before calibration existed has no table; the others keep theirs
    _strip_calibration(tmp_path / "miniimagenet/resnet12/seed2/mtl/5shot/metrics.json")
    partial = pooled_reliability(load_runs(pairs))
    assert set(pooled) - set(partial) == {("miniimagenet", "miniimagenet", "resnet12", "mtl", 5)}
    assert all(partial[key]["count"] == pooled[key]["count"] for key in partial)


def test_the_reliability_plot_draws_each_bins_accuracy_against_its_confidence(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    import mtl.plots

    rng = np.random.default_rng(8)
    calibration = {(m, s): _random_calibration(rng) for m in ("ft", "mtl") for s in (1, 2, 3)}
    runs = load_runs(_hand_runs(tmp_path, calibration=calibration))
    summary, pooled = build_summary(runs), pooled_reliability(runs)
    ax = Figure().subplots()
    mtl.plots._reliability_panel(ax, summary, pooled, False)
    lines = {line.get_label(): line for line in ax.lines}
    assert lines["perfect calibration"].get_xydata().tolist() == [[0, 0], [100, 100]]
    for method in ("ft", "mtl"):
        tables = [calibration[method, s]["reliability"] for s in (1, 2, 3)]
        count, confidence, correct = (np.sum([t[key] for t in tables], axis=0)
                                      for key in ("count", "confidence", "correct"))
        filled = count > 0
        ece = 100 * np.abs(correct - confidence).sum() / count.sum()
        (label,) = [name for name in lines if name.startswith(f"{method} (ECE ")]
        assert label == f"{method} (ECE {ece:.1f})"
        xy = lines[label].get_xydata()
        assert xy[:, 0] == pytest.approx(100 * confidence[filled] / count[filled])
        assert xy[:, 1] == pytest.approx(100 * correct[filled] / count[filled])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == list(lines)
    path = mtl.plots.plot_reliability(summary, pooled, tmp_path / "plots" / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_summary_md_and_the_front_page_show_ece_before_and_after_calibration(tmp_path):
    from docutils.core import publish_parts

    from mtl.results.render import CALIBRATION_TITLES

    table = _summary(_hand_runs(tmp_path, calibration=_hand_calibration()))
    ft_ece = f"12.00 → 7.00 ± {T_975_2DOF * math.sqrt(13 / 3):.2f}"
    ft_nll = f"1.233 → 0.900 ± {T_975_2DOF * 0.1 / math.sqrt(3):.3f}"
    markdown = summary_markdown(table)
    calibration = markdown[markdown.index("## Calibration"):]
    assert "**miniimagenet, resnet12**" in calibration and "15 equal-width bins" in calibration
    assert f"| 1 | ft | {ft_ece} | {ft_nll} |" in calibration
    assert markdown.index("## Verdicts") < markdown.index("## Calibration")
    tables = _front_page_tables(summary_rst(table))
    assert [caption for caption, _, _ in tables] == ["miniimagenet, resnet12"] * 2
    _, titles, rows = tables[1]
    assert titles == list(CALIBRATION_TITLES)
    assert rows[0] == ["1", "ft", ft_ece.replace(" ", "\u00a0"), ft_nll.replace(" ", "\u00a0")]
    html = publish_parts(summary_rst(table), writer="html", settings_overrides={"halt_level": 2, "report_level": 2})
    assert "Calibration" in html["html_body"] and "15 equal-width bins" in html["html_body"]


# ----------------------------------------------------------------------------- the workflow tests' check
def _written_tables(root, pairs):
    """summary.csv and summary_per_seed.csv as the workflow writes them (rounded), read back."""
    runs = load_runs(pairs)
    out = root / "written"
    write_summary(build_summary(runs), per_seed_table(runs), csv_path=out / "summary.csv",
                  per_seed_csv_path=out / "per_seed.csv", md_path=out / "summary.md")
    return pd.read_csv(out / "summary.csv"), pd.read_csv(out / "per_seed.csv")


def _random_runs(root, seeds, ft_seeds=None):
    """ft and three methods on random episodes; each method's shift varies by seed and episode, and
    each run has random calibration errors."""
    runs, rng, calibration_rng = [], np.random.default_rng(5), np.random.default_rng(6)
    for seed in seeds:
        base = _accuracies(seed)
        for method in ("ft", "proto", "mtl", "mtl_ht"):
            if method == "ft" and seed not in (ft_seeds or seeds):
                continue
            shift = 0 if method == "ft" else rng.integers(-6, 9, N_EPISODES) / 75
            runs.append(_write_run(root, method, 1, np.clip(base + shift, 0, 1), _random_calibration(calibration_rng),
                                   seed=seed))
    return runs


@pytest.mark.parametrize("case", ["two seeds", "three seeds", "ft on fewer seeds", "one seed", "transfer"])
def test_the_workflow_check_accepts_what_the_summary_step_writes(tmp_path, case):
    from tests.summary_check import assert_summary_matches_per_seed

    pairs = {"two seeds": lambda: _random_runs(tmp_path, (1, 2)),
             "three seeds": lambda: _random_runs(tmp_path, (1, 2, 3)),
             "ft on fewer seeds": lambda: _random_runs(tmp_path, (1, 2, 3), ft_seeds=(1, 3)),
             "one seed": lambda: _random_runs(tmp_path, (4,)),
             "transfer": lambda: _transfer_runs(tmp_path)}[case]()
    assert_summary_matches_per_seed(*_written_tables(tmp_path, pairs))


@pytest.mark.parametrize("wrong", [
    "episode interval as ci95", "normal quantile for ci95", "episode interval as diff_vs_ft_ci95",
    "accuracy off by 0.02", "diff_vs_ft off by 0.02", "n_seeds as the paired count", "verdict from the episodes",
    "ece interval with ddof=0", "ece interval over episodes", "nll interval from the normal quantile",
    "ece before and after swapped", "nll off by 0.002", "ece_uncalibrated off by 0.02",
])
def test_the_workflow_check_refuses_wrong_statistics(tmp_path, wrong):
    from scipy.stats import t

    from tests.summary_check import assert_summary_matches_per_seed

    summary, per_seed = _written_tables(tmp_path, _random_runs(tmp_path, (1, 2, 3), ft_seeds=(1, 2)))
    others = summary["method"] != "ft"
    n = summary["n_seeds"]
    if wrong == "ece interval with ddof=0":
        summary["ece_ci95"] = (summary["ece_ci95"] * np.sqrt((n - 1) / n)).round(2)
    elif wrong == "ece interval over episodes":  # n the episodes of a run instead of the seeds
        summary["ece_ci95"] = (summary["ece_ci95"] * np.sqrt(n) / np.sqrt(summary["episodes"])).round(2)
    elif wrong == "nll interval from the normal quantile":
        summary["nll_ci95"] = (summary["nll_ci95"] * 1.96 / t.ppf(0.975, n - 1)).round(3)
    elif wrong == "ece before and after swapped":
        summary[["ece", "ece_uncalibrated"]] = summary[["ece_uncalibrated", "ece"]].to_numpy()
    elif wrong == "nll off by 0.002":
        summary.loc[1, "nll"] += 0.002
    elif wrong == "ece_uncalibrated off by 0.02":
        summary.loc[3, "ece_uncalibrated"] += 0.02
    elif wrong == "episode interval as ci95":
        summary["ci95"] = summary["episode_ci95"]
    elif wrong == "normal quantile for ci95":
        summary["ci95"] = (summary["ci95"] * 1.96 / 4.302652729911275).round(2)
    elif wrong == "episode interval as diff_vs_ft_ci95":
        summary.loc[others, "diff_vs_ft_ci95"] = summary.loc[others, "diff_vs_ft_episode_ci95"]
    elif wrong == "accuracy off by 0.02":
        summary.loc[2, "accuracy"] += 0.02
    elif wrong == "diff_vs_ft off by 0.02":
        summary.loc[others, "diff_vs_ft"] += 0.02
    elif wrong == "n_seeds as the paired count":
        summary.loc[others, "seeds_paired_with_ft"] = summary.loc[others, "n_seeds"]
    else:
        episode_verdicts = [verdict(d, e, 2) for d, e in zip(summary["diff_vs_ft"], summary["diff_vs_ft_episode_ci95"])]
        changed = others & (pd.Series(episode_verdicts) != summary["verdict"])
        assert changed.any()  # the example is one where the two intervals disagree
        summary.loc[changed, "verdict"] = pd.Series(episode_verdicts)[changed]
    with pytest.raises(AssertionError):
        assert_summary_matches_per_seed(summary, per_seed)
