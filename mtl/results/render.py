"""The summary as people read it: the verdict sentences, and the files of the summarize step
(``summary.csv`` and the per-seed CSV rounded to 2 decimals, ``summary.md``, and ``summary.rst``, the
front page of ``snakemake --report``), all from the tables of :mod:`mtl.results.tables`.
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


def _round(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracies and differences to 2 decimals; counts and text as they are."""
    rounded = df.copy()
    for column in rounded.columns:
        if column.startswith(("accuracy", "ci95", "seed_std", "episode_ci95", "diff_vs_", "reference_a", "reference_c")):
            rounded[column] = pd.to_numeric(rounded[column]).round(2)
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


def summary_markdown(summary: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The summary as Markdown: how to read it, the table, the verdicts, then reference sources."""
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
    and backbone, each cell's spaces non-breaking; the explanations and verdicts as in summary.md.
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
        tested = dataset if source == dataset else f"trained on {source}, tested on {dataset}"
        lines += _rst_table([titles[i] for i in shown], group, f"{tested}, {backbone}")
    lines += [f"The episode interval and **seeds above {baseline}** of each row are in results/summary.md "
              "and results/summary.csv; the verdicts below give each paired difference with its seeds.", ""]
    lines += [f"- {text}".replace("`", "``") for text in _explanation(baseline, _has_transfer(summary))] + [""]
    sentences = verdict_sentences(summary, baseline)
    if sentences:
        lines += ["Verdicts", "--------", ""] + [f"- {s}" for s in sentences] + [""]
    lines += [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    return "\n".join(lines) + "\n"

