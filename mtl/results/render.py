"""The summary as people read it: the verdict sentences, and the files of the summarize step
(``summary.csv`` and the per-seed CSV, rounded to :data:`DECIMALS`, ``summary.md``, and ``summary.rst``,
the front page of ``snakemake --report``), all from the tables of :mod:`mtl.results.tables`.
"""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from mtl.errors import ConfigError
from mtl.io import atomic_path
from mtl.results.runs import TRAINED_ON, is_transfer
from mtl.results.tables import BASELINE
from mtl.stats import SEED_INTERVAL


# ----------------------------------------------------------------------------- verdict sentences
def verdict_sentences(summary: pd.DataFrame, baseline: str = BASELINE) -> list[str]:
    """One sentence per method compared with the baseline, worded from the numbers alone."""
    sentences = []
    for row in summary.itertuples(index=False):
        row = row._asdict()
        if row["method"] == baseline or pd.isna(row[f"diff_vs_{baseline}"]):
            continue
        sentences.append(_sentence(row, baseline))
    return sentences


def _sentence(row: Mapping, baseline: str) -> str:
    method, diff = row["method"], row[f"diff_vs_{baseline}"]
    where = (f"trained on {row[TRAINED_ON]}, tested on {row['dataset']}" if is_transfer(row)
             else f"{row['dataset']}")
    subject = f"{method} vs {baseline}, {where} {row['way']}-way {row['shot']}-shot"
    n = int(row[f"seeds_paired_with_{baseline}"])  # the difference's seeds, not the method's own n_seeds
    if row["verdict"] == "training variance not measured":
        return (f"{subject}: {diff:+.2f} points on 1 seed (± {row[f'diff_vs_{baseline}_episode_ci95']:.2f} from "
                "test-episode sampling alone): training variance not measured, so no verdict; "
                "run more training seeds (protocol.seeds).")
    above = int(row[f"seeds_above_{baseline}"])
    conclusion = {
        "better": f"{method} is better",
        "worse": f"{method} is worse",
        "no detectable difference": "no detectable difference",
    }[row["verdict"]]
    return (f"{subject}: {diff:+.2f} ± {row[f'diff_vs_{baseline}_ci95']:.2f} points over {n} seeds "
            f"({above} of {n} favour {method}): {conclusion}.")


# ----------------------------------------------------------------------------- summary files
def _baseline_of(df: pd.DataFrame) -> str:
    names = [c[len("diff_vs_"):] for c in df.columns
             if c.startswith("diff_vs_") and not c.endswith("_ci95")]
    if len(names) != 1:
        raise ConfigError(f"summary table: expected one diff_vs_<baseline> column, found columns {list(df.columns)}")
    return names[0]


#: Decimals of the written tables, by column prefix: accuracies, differences and ECE in points to 2;
#: NLL in nats to 3 (one run's is about 0.1-1.5); the temperature to 4 (a factor on the scores).
DECIMALS = {("accuracy", "ci95", "seed_std", "episode_ci95", "diff_vs_", "reference_a", "reference_c", "ece"): 2,
            ("nll",): 3, ("temperature",): 4}


def _round(df: pd.DataFrame) -> pd.DataFrame:
    """Numbers to :data:`DECIMALS`; counts and text as they are."""
    rounded = df.copy()
    for column in rounded.columns:
        for prefixes, decimals in DECIMALS.items():
            if column.startswith(prefixes):
                rounded[column] = pd.to_numeric(rounded[column]).round(decimals)
        if column.startswith("seeds_") and column != "seeds":
            rounded[column] = pd.to_numeric(rounded[column]).astype("Int64")
    return rounded


def write_summary(summary: pd.DataFrame, per_seed: pd.DataFrame, *, csv_path, per_seed_csv_path, md_path,
                  rst_path=None) -> None:
    """Write ``summary.csv``, the per-seed CSV, ``summary.md`` (and the report's RST), atomically."""
    baseline = _baseline_of(summary)
    with atomic_path(csv_path) as tmp:
        _round(summary).to_csv(tmp, index=False)
    with atomic_path(per_seed_csv_path) as tmp:
        _round(per_seed).to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(summary_markdown(summary, baseline))
    if rst_path is not None:
        with atomic_path(rst_path) as tmp:
            tmp.write_text(summary_rst(summary, baseline))


def plus_minus(value, interval, signed: bool = False, decimals: int = 2) -> str:
    """"60.63 ± 5.29" (empty for a missing value; the value alone without an interval)."""
    if value is None or pd.isna(value):
        return ""
    sign = "+" if signed else ""
    if interval is None or pd.isna(interval):
        return f"{value:{sign}.{decimals}f}"
    return f"{value:{sign}.{decimals}f} ± {interval:.{decimals}f}"


def _table_cells(summary: pd.DataFrame, baseline: str) -> tuple[list[str], list[list[str]], list[str]]:
    """Titles, rows and reference sources of the readable summary table (Markdown and RST share it)."""
    sources = [s for s in dict.fromkeys(summary["reference_source"]) if isinstance(s, str) and s]
    # a "trained on" column only when some row was trained elsewhere: in-domain tables read as before
    transfer = _has_transfer(summary)
    titles = ["trained on"] * transfer + ["dataset", "backbone", "shot", "method", "seeds", "accuracy (%)",
                                          "episode interval", f"vs {baseline} (pp)", f"seeds above {baseline}",
                                          "published (%)"]
    rows = []
    for row in summary.itertuples(index=False):
        row = row._asdict()
        published = plus_minus(row["reference_accuracy"], row["reference_ci95"], decimals=1)
        if published:
            published += f" [{sources.index(row['reference_source']) + 1}]"
        above = row[f"seeds_above_{baseline}"]
        rows.append([row[TRAINED_ON]] * transfer + [
            row["dataset"], row["backbone"], row["shot"], row["method"], row["n_seeds"],
            plus_minus(row["accuracy"], row["ci95"]), f"± {row['episode_ci95']:.2f}",
            plus_minus(row[f"diff_vs_{baseline}"], row[f"diff_vs_{baseline}_ci95"], signed=True),
            "" if pd.isna(above) else f"{int(above)} of {int(row[f'seeds_paired_with_{baseline}'])}", published,
        ])
    return titles, [[str(c) for c in r] for r in rows], sources


def _protocol_line(summary: pd.DataFrame) -> str:
    first = summary.iloc[0]
    seeds = sorted({int(s) for cell in summary["seeds"] for s in str(cell).split()})
    return (f"{first['way']}-way, {first['query']} queries per class, {first['episodes']} fixed test episodes "
            f"(episode seed {first['episode_seed']}), training seeds {', '.join(map(str, seeds))}.")


def _has_transfer(summary: pd.DataFrame) -> bool:
    return bool((summary[TRAINED_ON] != summary["dataset"]).any())


def _explanation(baseline: str, transfer: bool = False) -> list[str]:
    transfer_note = [
        "**trained on** is the dataset whose training (pre-training, meta-training) produced the models; "
        "**dataset** is the test data. Where they differ the row is a transfer row: the models trained on "
        "the first dataset scored on the saved test episodes of the second (the same episodes for every "
        f"source), its **vs {baseline}** paired with `{baseline}` trained on the same dataset, seed by seed. "
        "No published figure applies to them.",
    ] if transfer else []
    return [
        "**accuracy** is the mean over training seeds of each run's mean test accuracy, ± the 95% "
        f"interval over seeds `{SEED_INTERVAL}` (Student t, n_seeds-1 degrees of freedom): the "
        "spread a rerun with other seeds would show. With one seed there is no such interval "
        "(training variance not measured).",
        "**episode interval** is the reference code's interval `1.96*std/sqrt(n)` over the test episodes "
        "of the seed-averaged per-episode accuracies: test-episode sampling only.",
        f"**vs {baseline}** is the paired difference to `{baseline}` in percentage points: per seed, the mean "
        f"over the same episodes of method minus `{baseline}` (same pre-trained encoder), then the mean over "
        f"the seeds both ran ± its t-interval over those paired seeds; **seeds above** counts the paired "
        f"seeds where the method scored higher, out of all paired seeds (`seeds_paired_with_{baseline}` in "
        f"summary.csv: fewer than **seeds** when `{baseline}` lacks some of the method's seeds).",
        "**Published** figures are from the papers under their own protocol (5-way only, see the notes); "
        "their intervals are not comparable with ours.",
    ] + transfer_note


#: Columns of the calibration tables (summary.md and the report's front page), one per trained-on,
#: dataset and backbone; each ECE and NLL cell reads "uncalibrated -> calibrated ± interval".
CALIBRATION_TITLES = ("shot", "method", "ECE (points)", "NLL (nats)")
CALIBRATION_EXPLANATION = (
    "**ECE** is the expected calibration error of the probabilities of the test queries, in points "
    "(0-100): a run's queries are grouped into 15 equal-width bins of confidence (the probability of the "
    "predicted class), and ECE is the mean over queries of the gap between the accuracy and the mean "
    "confidence of their bin. "
    "**NLL** is the mean negative log-likelihood of the true class, in nats.",
    "Each cell reads *uncalibrated → calibrated*: the learner's own probabilities (softmax of its scores), "
    "then softmax(scores / T) with the temperature T each run fitted on validation episodes of the data it "
    "was trained on (`calibration.episodes`; no test label). The calibrated value is the mean over training "
    f"seeds of each run's value ± the 95% interval over seeds `{SEED_INTERVAL}`, as for accuracy; the "
    "uncalibrated one is the mean over seeds. A temperature changes no prediction: the accuracies are the "
    "same with and without it. Per run (with its temperature): summary_per_seed.csv.",
)


def _group_caption(trained_on: str, dataset: str, backbone: str) -> str:
    """"fc100, resnet12", or "trained on fc100, tested on my_parts, resnet12" for transfer rows."""
    tested = dataset if trained_on == dataset else f"trained on {trained_on}, tested on {dataset}"
    return f"{tested}, {backbone}"


def _before_after(before, after, interval, decimals: int) -> str:
    """"14.20 → 3.10 ± 1.20": uncalibrated, then calibrated with its interval (empty where not recorded)."""
    if pd.isna(after):
        return ""
    return f"{before:.{decimals}f} → {plus_minus(after, interval, decimals=decimals)}"


def _calibration_groups(summary: pd.DataFrame) -> dict[str, list[list[str]]]:
    """The calibration table's rows (:data:`CALIBRATION_TITLES`) per trained-on, dataset and backbone,
    in the summary's order; rows evaluated before calibration existed are left out, and with them a
    group that has no other row."""
    groups: dict[str, list[list[str]]] = {}
    for row in summary.itertuples(index=False):
        if pd.isna(row.ece):
            continue
        groups.setdefault(_group_caption(getattr(row, TRAINED_ON), row.dataset, row.backbone), []).append([
            str(row.shot), row.method, _before_after(row.ece_uncalibrated, row.ece, row.ece_ci95, 2),
            _before_after(row.nll_uncalibrated, row.nll, row.nll_ci95, 3),
        ])
    return groups


def summary_markdown(summary: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The summary as Markdown: how to read it, the table, the verdicts, reference sources, then the
    calibration tables (none when no run recorded its calibration)."""
    titles, rows, sources = _table_cells(summary, baseline)
    lines = ["# Few-shot test results", "", _protocol_line(summary), ""]
    lines += [f"- {text}" for text in _explanation(baseline, _has_transfer(summary))] + [""]
    lines += ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    sentences = verdict_sentences(summary, baseline)
    if sentences:
        lines += ["", "## Verdicts", ""] + [f"- {s}" for s in sentences]
    if sources:
        lines += [""] + [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    groups = _calibration_groups(summary)
    if groups:
        lines += ["", "## Calibration", ""] + [f"- {text}" for text in CALIBRATION_EXPLANATION]
        for caption, cells in groups.items():
            lines += ["", f"**{caption}**", "", "| " + " | ".join(CALIBRATION_TITLES) + " |",
                      "|" + "---|" * len(CALIBRATION_TITLES)]
            lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


#: Columns of the report's front page (``summary_rst``), one table per trained-on/dataset/backbone.
#: Snakemake's report draws the front page in a column 32 rem (512 px) wide next to the workflow
#: graph: the full table of ``summary.md`` overflowed it under the graph and wrapped every number.
#: The episode interval and the seeds-above count stay in summary.md and summary.csv; the verdicts
#: below the table repeat each paired difference with its seed count. ``seeds`` is shown only when
#: rows ran different seeds (otherwise the protocol line above says them): with it, a long method
#: name such as ``mtl_no_pretrain`` no longer fits.
FRONT_PAGE_COLUMNS = ("shot", "method", "seeds", "accuracy (%)", "vs {baseline} (pp)", "published (%)")
#: Joins the parts of a front-page cell ("60.63 ± 5.29"), so a browser cannot wrap a number.
NBSP = "\u00a0"


def _rst_table(titles: list[str], rows: list[list[str]], caption: str) -> list[str]:
    """A ``.. table::`` directive holding a simple table, the caption as its title."""
    cells = [titles] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(titles))]
    rule = "  ".join("=" * w for w in widths)

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    body = [rule, line(titles), rule] + [line(r) for r in rows] + [rule]
    return [f".. table:: {caption}", ""] + ["   " + text for text in body] + [""]


def summary_rst(summary: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The summary and verdicts as reStructuredText, for the front page of ``snakemake --report``.

    A compact table (:data:`FRONT_PAGE_COLUMNS`, the same cells as summary.md) per trained-on, dataset
    and backbone, each cell's spaces non-breaking; the explanations and verdicts as in summary.md; then
    summary.md's calibration tables.
    """
    titles, rows, sources = _table_cells(summary, baseline)
    same_seeds = summary["seeds"].nunique() == 1
    shown = [titles.index(title.format(baseline=baseline)) for title in FRONT_PAGE_COLUMNS
             if not (title == "seeds" and same_seeds)]
    group_of = [titles.index(title) for title in ("dataset", "backbone")]
    trained_on = titles.index("trained on") if "trained on" in titles else None
    groups: dict[tuple, list[list[str]]] = {}
    for r in rows:
        source = r[trained_on] if trained_on is not None else r[group_of[0]]
        groups.setdefault((source,) + tuple(r[i] for i in group_of), []).append(
            [r[i].replace(" ", NBSP) for i in shown])

    lines = ["Few-shot test results", "=====================", "", _protocol_line(summary), ""]
    for (source, dataset, backbone), group in groups.items():
        lines += _rst_table([titles[i] for i in shown], group, _group_caption(source, dataset, backbone))
    lines += [f"The episode interval and **seeds above {baseline}** of each row are in results/summary.md "
              "and results/summary.csv; the verdicts below give each paired difference with its seeds.", ""]
    lines += [f"- {text}".replace("`", "``") for text in _explanation(baseline, _has_transfer(summary))] + [""]
    sentences = verdict_sentences(summary, baseline)
    if sentences:
        lines += ["Verdicts", "--------", ""] + [f"- {s}" for s in sentences] + [""]
    lines += [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    calibration = _calibration_groups(summary)
    if calibration:
        lines += ["", "Calibration", "-----------", ""]
        for caption, cells in calibration.items():
            lines += _rst_table(list(CALIBRATION_TITLES), [[c.replace(" ", NBSP) for c in r] for r in cells], caption)
        lines += [f"- {text}".replace("`", "``") for text in CALIBRATION_EXPLANATION]
    return "\n".join(lines) + "\n"

